"""One open RealSense device or recording: what `RealSenseSource` reads (depth, colour) pairs from.

Kept apart from `realsense.py` so the fault handling there stays readable.
Everything here talks to pyrealsense2 objects, passed in as `rs`.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from edge.capture.source import EndOfStream, SourceError
from edge.types import Intrinsics

if TYPE_CHECKING:
    from pathlib import Path

log = structlog.get_logger(__name__)

_SYNC_MODES = {"default": 0.0, "master": 1.0, "slave": 2.0}
_COLOR_FORMATS = ("bgr8", "rgb8")
_SYNCER_FRAMESETS = 4  # pairs the syncer holds before playback waits for the reader


def intrinsics_of(rs_intr: Any) -> Intrinsics:
    """Our `Intrinsics` from `rs.intrinsics`."""
    c = [float(v) for v in rs_intr.coeffs]
    return Intrinsics(width=int(rs_intr.width), height=int(rs_intr.height),
                      fx=float(rs_intr.fx), fy=float(rs_intr.fy), cx=float(rs_intr.ppx),
                      cy=float(rs_intr.ppy), coeffs=(c[0], c[1], c[2], c[3], c[4]))


class Session(Protocol):
    serial: str
    color_intrinsics: Intrinsics
    depth_scale_m: float
    needs_align: bool
    color_is_rgb: bool

    def wait(self, timeout_ms: int) -> tuple[Any, Any] | None:
        """(depth, colour) rs frames; None on timeout; EndOfStream when a recording ends."""
        ...

    def composite(self, depth: Any, color: Any) -> Any:
        """A frameset holding both frames (input of `rs.align`)."""
        ...

    def removed_by(self, event: Any) -> bool: ...

    def close(self) -> None: ...


class _Composer:
    """Builds an `rs.composite_frame` from two frames with a processing block."""

    def __init__(self, rs: Any) -> None:
        self._pending: list[Any] = []
        self._block = rs.processing_block(self._combine)
        self._out = rs.frame_queue(1, keep_frames=True)
        self._block.start(self._out)

    def _combine(self, _frame: Any, source: Any) -> None:
        source.frame_ready(source.allocate_composite_frame(self._pending))

    def __call__(self, depth: Any, color: Any) -> Any:
        self._pending = [depth, color]
        self._block.invoke(depth)
        return self._out.wait_for_frame(1000).as_frameset()


class PlaybackSession:
    """A `.db3`/`.bag` recording played through the SDK's playback device."""

    def __init__(self, rs: Any, path: Path, *, realtime: bool,
                 expect_size: tuple[int, int]) -> None:
        self.rs, self.path = rs, path
        try:
            self.device = rs.context().load_device(str(path))
        except RuntimeError as exc:
            raise SourceError(f"recording {path} cannot be opened (corrupt or not a "
                              f"RealSense recording): {exc}") from None
        self.playback = self.device.as_playback()
        self.playback.set_real_time(realtime)
        self.serial = str(self.device.get_info(rs.camera_info.serial_number))
        streams = self._find_streams()
        depth_sensor, depth_profile = streams["depth"]
        color_profile = streams["color"][1]
        dvp, cvp = depth_profile.as_video_stream_profile(), color_profile.as_video_stream_profile()
        self.color_intrinsics = intrinsics_of(cvp.get_intrinsics())
        size = (self.color_intrinsics.width, self.color_intrinsics.height)
        if size != expect_size:
            raise SourceError(f"recording {path}: colour stream is {size[0]}x{size[1]}, but the "
                              f"camera's configuration and calibration expect "
                              f"{expect_size[0]}x{expect_size[1]}")
        self.depth_scale_m = float(depth_sensor.as_depth_sensor().get_depth_scale())
        self.color_is_rgb = color_profile.format() == rs.format.rgb8
        try:
            ext = dvp.get_extrinsics_to(cvp)
            identity = list(ext.rotation) == [1, 0, 0, 0, 1, 0, 0, 0, 1] and not any(
                ext.translation)
        except RuntimeError:  # not stored: streams written already aligned (our recordings)
            identity = True
        self.needs_align = not identity or intrinsics_of(dvp.get_intrinsics()) != (
            self.color_intrinsics)
        # The SDK's own syncer pairs depth with colour in native code: no Python callback per
        # frame on the SDK's threads (each one had to take the GIL from the node's threads).
        # Not real time, playback blocks on a full syncer instead of dropping frames.
        self._syncer = rs.syncer(_SYNCER_FRAMESETS)
        self._frameset: Any = None  # the last pair as the syncer delivered it (for rs.align)
        self._held: dict[str, Any] = {}
        self._period_ms = 1000.0 / max(1, color_profile.fps())
        self._closed = False
        self._composer = _Composer(rs)
        self._sensors: list[Any] = []
        grouped: dict[str, tuple[Any, list[Any]]] = {}
        for sensor, profile in (streams["depth"], streams["color"]):
            name = str(sensor.get_info(rs.camera_info.name))
            grouped.setdefault(name, (sensor, []))[1].append(profile)
        for sensor, profiles in grouped.values():
            sensor.open(profiles if len(profiles) > 1 else profiles[0])
            self._sensors.append(sensor)
        self.playback.pause()
        for sensor in self._sensors:
            sensor.start(self._syncer)
        self.playback.resume()

    def _find_streams(self) -> dict[str, tuple[Any, Any]]:
        found: dict[str, tuple[Any, Any]] = {}
        names = []
        for sensor in self.device.query_sensors():
            for profile in sensor.get_stream_profiles():
                kind, fmt = profile.stream_type(), profile.format()
                names.append(f"{kind.name}/{fmt.name}")
                if kind == self.rs.stream.depth and fmt == self.rs.format.z16:
                    found.setdefault("depth", (sensor, profile))
                elif kind == self.rs.stream.color and fmt.name in _COLOR_FORMATS:
                    found.setdefault("color", (sensor, profile))
        for kind, want in (("depth", "a z16 depth stream"), ("color", "a bgr8/rgb8 colour stream")):
            if kind not in found:
                raise SourceError(f"recording {self.path} has no {kind} stream: need {want}, "
                                  f"found {', '.join(names) or 'no streams'}")
        return found

    def wait(self, timeout_ms: int) -> tuple[Any, Any] | None:
        remaining = timeout_ms
        while True:
            stopped = self.playback.current_status() == self.rs.playback_status.stopped
            step = min(remaining, 50)
            ok, frameset = self._syncer.try_wait_for_frames(step)
            if not ok:
                if stopped:
                    raise EndOfStream(f"recording {self.path} ended")
                remaining -= step
                if remaining <= 0:
                    return None
                continue
            depth, color = frameset.get_depth_frame(), frameset.get_color_frame()
            if depth and color:
                self._held.clear()
                self._frameset = frameset
                return depth, color
            # The syncer hands over a frame alone until it has seen both streams (the first
            # frame of a recording): pair those by timestamp here.
            self._frameset = None
            pair = self._pair_single(depth if depth else color)
            if pair is not None:
                return pair

    def _pair_single(self, frame: Any) -> tuple[Any, Any] | None:
        kind = "depth" if frame.get_profile().stream_type() == self.rs.stream.depth else "color"
        self._held[kind] = frame
        if len(self._held) < 2:
            return None
        d, c = self._held["depth"], self._held["color"]
        skew = float(d.get_timestamp()) - float(c.get_timestamp())
        if abs(skew) <= self._period_ms / 2:
            self._held.clear()
            return d, c
        del self._held["depth" if skew < 0 else "color"]  # the older one has no partner
        return None

    def composite(self, depth: Any, color: Any) -> Any:
        if self._frameset is not None:
            return self._frameset
        return self._composer(depth, color)

    def removed_by(self, event: Any) -> bool:
        return False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # A playback blocked on a full syncer would block sensor.stop() for ever: stop from a
        # helper thread while this one drains the syncer.
        stopper = threading.Thread(target=self._stop_sensors, name="playback-stop", daemon=True)
        stopper.start()
        while stopper.is_alive():
            self._syncer.try_wait_for_frames(10)
        self._held.clear()
        self._frameset = None

    def _stop_sensors(self) -> None:
        for sensor in self._sensors:
            try:
                sensor.stop()
                sensor.close()
            except RuntimeError as exc:
                log.debug("playback_close_failed", path=str(self.path), error=str(exc))


class LiveSession:
    """A live camera by serial, streaming through an `rs.pipeline`."""

    def __init__(self, rs: Any, context: Any, serial: str, size: tuple[int, int], fps: int,
                 sync_mode: str) -> None:
        self.rs, self.serial = rs, serial
        present = [d.get_info(rs.camera_info.serial_number) for d in context.query_devices()]
        if serial not in present:
            raise RuntimeError(f"no RealSense with serial {serial} is connected "
                               f"(connected: {', '.join(present) or 'none'})")
        self.pipeline = rs.pipeline()
        cfg = rs.config()
        cfg.enable_device(serial)
        cfg.enable_stream(rs.stream.depth, size[0], size[1], rs.format.z16, fps)
        cfg.enable_stream(rs.stream.color, size[0], size[1], rs.format.bgr8, fps)
        try:
            resolved = cfg.resolve(rs.pipeline_wrapper(self.pipeline))
        except RuntimeError as exc:
            raise SourceError(f"camera {serial}: cannot stream {size[0]}x{size[1]}@{fps} "
                              f"depth+colour: {exc}") from None
        self.device = resolved.get_device()
        self._configure(sync_mode)
        profile = self.pipeline.start(cfg)
        color = profile.get_stream(rs.stream.color).as_video_stream_profile()
        self.color_intrinsics = intrinsics_of(color.get_intrinsics())
        self.depth_scale_m = float(self.device.first_depth_sensor().get_depth_scale())
        self.needs_align = True
        self.color_is_rgb = False
        self._last: Any = None

    def _configure(self, sync_mode: str) -> None:
        rs = self.rs
        for sensor in self.device.query_sensors():
            if sensor.supports(rs.option.global_time_enabled):
                sensor.set_option(rs.option.global_time_enabled, 1.0)
        depth = self.device.first_depth_sensor()
        if sync_mode != "default":
            if not depth.supports(rs.option.inter_cam_sync_mode):
                raise SourceError(f"camera {self.serial} does not support hardware sync "
                                  f"(inter_cam_sync_mode); set sync_mode: default")
            depth.set_option(rs.option.inter_cam_sync_mode, _SYNC_MODES[sync_mode])
        log.info("camera_opened", serial=self.serial, sync_mode=sync_mode,
                 name=self.device.get_info(rs.camera_info.name))

    def wait(self, timeout_ms: int) -> tuple[Any, Any] | None:
        ok, frames = self.pipeline.try_wait_for_frames(timeout_ms)
        if not ok:
            return None
        depth, color = frames.get_depth_frame(), frames.get_color_frame()
        if not depth or not color:
            return None
        self._last = frames
        return depth, color

    def composite(self, depth: Any, color: Any) -> Any:
        return self._last

    def removed_by(self, event: Any) -> bool:
        return bool(event.was_removed(self.device))

    def close(self) -> None:
        try:
            self.pipeline.stop()
        except RuntimeError as exc:
            log.debug("pipeline_stop_failed", serial=self.serial, error=str(exc))
