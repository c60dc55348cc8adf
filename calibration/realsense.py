"""RealSense input for the calibration commands: recordings (.db3/.bag) and live cameras.

pyrealsense2 is imported only when one of these functions runs. Recordings
are played back by the SDK through the node's own `RealSenseSource` (not real
time, depth aligned to colour), so the calibration sees a file exactly as the
node does. The live-camera functions (`--camera SERIAL`, an `rs.pipeline` by
serial) could not be run in this project's CI, which has no camera: they are
untested here beyond "camera not connected" errors.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.capture.realsense import RealSenseSource
from edge.capture.recording import import_realsense
from edge.capture.source import EndOfStream, SourceError
from edge.types import Intrinsics, U8Array, U16Array, distortion


@dataclass(frozen=True, slots=True)
class RgbdFrame:
    color: U8Array | None  # BGR
    depth: U16Array | None  # aligned to colour when both exist


@dataclass(frozen=True, slots=True)
class StreamInfo:
    serial: str
    color_intrinsics: Intrinsics | None  # factory intrinsics of the colour stream
    depth_intrinsics: Intrinsics | None
    depth_scale_m: float


def _intrinsics(rs_intr: Any) -> Intrinsics:
    coeffs = distortion(rs_intr.coeffs)
    return Intrinsics(int(rs_intr.width), int(rs_intr.height), float(rs_intr.fx),
                      float(rs_intr.fy), float(rs_intr.ppx), float(rs_intr.ppy),
                      coeffs)


def _info(rs: Any, profile: Any) -> StreamInfo:
    dev = profile.get_device()
    serial = dev.get_info(rs.camera_info.serial_number)
    color = depth = None
    scale = 0.001
    for sp in profile.get_streams():
        if sp.stream_type() == rs.stream.color:
            color = _intrinsics(sp.as_video_stream_profile().get_intrinsics())
        elif sp.stream_type() == rs.stream.depth:
            depth = _intrinsics(sp.as_video_stream_profile().get_intrinsics())
    for sensor in dev.query_sensors():
        if sensor.supports(rs.option.depth_units):
            scale = float(f"{sensor.get_option(rs.option.depth_units):.7g}")  # float32 in the SDK
    return StreamInfo(str(serial), color, depth, scale)


def _to_arrays(rs: Any, frames: Any, align: Any | None) -> RgbdFrame:
    if align is not None:
        frames = align.process(frames)
    c, d = frames.get_color_frame(), frames.get_depth_frame()
    color = None
    if c:
        color = np.asanyarray(c.get_data()).copy()
        if c.get_profile().format() == rs.format.rgb8:
            color = color[..., ::-1].copy()
    depth = np.asanyarray(d.get_data()).copy() if d else None
    return RgbdFrame(color, depth)


@contextmanager
def _pipeline(rs: Any, config: Any, what: str) -> Iterator[tuple[Any, Any]]:
    pipe = rs.pipeline()
    try:
        profile = pipe.start(config)
    except RuntimeError as exc:
        raise SourceError(f"{what}: cannot open it ({exc})") from None
    try:
        yield pipe, profile
    finally:
        pipe.stop()


def _require_device(rs: Any, serial: str) -> None:
    """Fail at once (the pipeline would wait 15 s) when no connected camera has this serial."""
    serials = [d.get_info(rs.camera_info.serial_number) for d in rs.context().query_devices()]
    if serial not in serials:
        found = ", ".join(serials) if serials else "none"
        raise SourceError(f"camera {serial}: cannot open it (not connected; connected RealSense "
                          f"serials: {found}); check the USB cable and the serial number")


def recording_info(path: Path) -> StreamInfo:
    """Serial, factory intrinsics and depth scale stored in a recording (no frames are read)."""
    if not Path(path).is_file():
        raise SourceError(f"--recording {path}: no such file")
    rs = import_realsense()
    try:
        device = rs.context().load_device(str(path))
    except RuntimeError as exc:
        raise SourceError(f"recording {path} cannot be opened (corrupt or not a RealSense "
                          f"recording): {exc}") from None
    color = depth = None
    scale = 0.001
    for sensor in device.query_sensors():
        for profile in sensor.get_stream_profiles():
            vsp = profile.as_video_stream_profile()
            if profile.stream_type() == rs.stream.color and color is None:
                color = _intrinsics(vsp.get_intrinsics())
            elif profile.stream_type() == rs.stream.depth and depth is None:
                depth = _intrinsics(vsp.get_intrinsics())
                scale = float(f"{sensor.as_depth_sensor().get_depth_scale():.7g}")
    return StreamInfo(str(device.get_info(rs.camera_info.serial_number)), color, depth, scale)


def read_recording(path: Path, count: int = 5, *, timeout_s: float = 5.0) -> tuple[
        StreamInfo, list[RgbdFrame]]:
    """Up to `count` frames of a recording, depth aligned to colour, and its stream info.

    Playback goes through the node's own `RealSenseSource` (not real time, so
    no frame is dropped), exactly as the node would see the file.
    """

    info = recording_info(path)
    if info.color_intrinsics is None or info.depth_intrinsics is None:
        raise SourceError(f"recording {path}: needs a depth and a colour stream (record both)")
    source = RealSenseSource("edge-calibrate", recording=Path(path), realtime=False,
                             width=info.color_intrinsics.width,
                             height=info.color_intrinsics.height)
    frames: list[RgbdFrame] = []
    source.start()
    try:
        while len(frames) < count:
            try:
                frame = source.read(timeout_s)
            except EndOfStream:
                break
            if frame is None:
                break
            frames.append(RgbdFrame(frame.color, frame.depth))
    finally:
        source.stop()
    if not frames:
        raise SourceError(f"recording {path}: no frames in it")
    return info, frames


def read_camera(serial: str, count: int = 5, *, width: int = 640, height: int = 480,
                fps: int = 30, color: bool = True, depth: bool = True,
                warmup: int = 15) -> tuple[StreamInfo, list[RgbdFrame]]:
    """Frames from a live RealSense (untested here: no camera in CI)."""
    rs = import_realsense()
    _require_device(rs, serial)
    config = rs.config()
    config.enable_device(serial)
    if color:
        config.enable_stream(rs.stream.color, width, height, rs.format.bgr8, fps)
    if depth:
        config.enable_stream(rs.stream.depth, width, height, rs.format.z16, fps)
    frames: list[RgbdFrame] = []
    with _pipeline(rs, config, f"camera {serial}") as (pipe, profile):
        info = _info(rs, profile)
        align = rs.align(rs.stream.color) if color and depth else None
        for _ in range(warmup):  # auto-exposure settles
            pipe.wait_for_frames(5000)
        while len(frames) < count:
            frames.append(_to_arrays(rs, pipe.wait_for_frames(5000), align))
    return info, frames


def camera_frames(serial: str, *, width: int = 640, height: int = 480,
                  fps: int = 30) -> Generator[tuple[StreamInfo, U8Array], None, None]:
    """Colour frames from a live camera until the caller stops iterating (untested here)."""
    rs = import_realsense()
    _require_device(rs, serial)
    config = rs.config()
    config.enable_device(serial)
    config.enable_stream(rs.stream.color, width, height, rs.format.bgr8, fps)
    with _pipeline(rs, config, f"camera {serial}") as (pipe, profile):
        info = _info(rs, profile)
        while True:
            frame = _to_arrays(rs, pipe.wait_for_frames(5000), None)
            if frame.color is not None:
                yield info, frame.color
