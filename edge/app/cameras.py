"""Opening the configured cameras: frame sources plus the belt geometry of each view."""

from __future__ import annotations

from edge.capture.calibration import CameraCalibration, InspectionRegion, load_camera_calibration
from edge.capture.realsense import RealSenseSource
from edge.capture.source import FrameSource
from edge.catalogue import load_catalogue
from edge.clock import Clock
from edge.config import CameraConfig, Config, ConfigError
from edge.perception.belt_plane import BeltPlane
from edge.perception.cameras import Cameras
from edge.sim.conveyor import SyntheticConveyor, SyntheticSource


def _calibration(cam: CameraConfig, index: int) -> CameraCalibration:
    if cam.calibration is None:
        raise ConfigError(f"cameras[{index}].calibration", None,
                          "a calibration file from `edge-calibrate belt` for a real camera")
    return load_camera_calibration(cam.calibration, serial=cam.serial,
                                   resolution=(cam.width // cam.filters.decimation,
                                               cam.height // cam.filters.decimation))


def _synthetic_calibration(world: SyntheticConveyor, camera_id: str, cfg: Config
                           ) -> CameraCalibration:
    """What `edge-calibrate belt` would write for a synthetic camera (its pose is exact)."""
    half_w = cfg.belt.width_mm / 2 - 20.0
    return CameraCalibration(serial=f"synthetic-{camera_id}",
                             intrinsics=world.intrinsics(camera_id),
                             pose=world.camera_pose(camera_id),
                             region=InspectionRegion(-300.0, 300.0, -half_w, half_w))


def open_cameras(cfg: Config, clock: Clock, world: SyntheticConveyor | None = None, *,
                 max_frames: int | None = None) -> Cameras:
    """Build every configured camera; synthetic views share one `world`."""
    sources: dict[str, FrameSource] = {}
    planes: dict[str, BeltPlane] = {}
    calibrations: dict[str, CameraCalibration] = {}
    synthetic = [c for c in cfg.cameras if c.source == "synthetic"]
    if synthetic and world is None:
        start = cfg.synthetic.start_ms if cfg.synthetic.start_ms is not None else clock.now_ms()
        world = SyntheticConveyor(cfg.synthetic, cfg.belt, synthetic, load_catalogue(),
                                  start_ms=start)
    for i, cam in enumerate(cfg.cameras):
        if cam.source == "synthetic":
            assert world is not None
            sources[cam.id] = SyntheticSource(world, cam.id, clock, realtime=cam.realtime,
                                              max_frames=max_frames)
            planes[cam.id] = BeltPlane(world.intrinsics(cam.id), world.camera_pose(cam.id))
            calibrations[cam.id] = _synthetic_calibration(world, cam.id, cfg)
            continue
        cal = _calibration(cam, i)
        calibrations[cam.id] = cal
        if cal.pose is None:
            raise ConfigError(f"cameras[{i}].calibration", str(cam.calibration),
                              "a calibration with the camera's belt pose (edge-calibrate belt)")
        sources[cam.id] = RealSenseSource(
            cam.id, serial=cam.serial if cam.source == "realsense" else None,
            recording=cam.recording if cam.source == "recording" else None,
            width=cam.width, height=cam.height, fps=cam.fps, filters=cam.filters,
            sync_mode=cam.sync_mode, realtime=cam.realtime)
        planes[cam.id] = BeltPlane(cal.intrinsics, cal.pose)
    return Cameras(sources, planes, calibrations)
