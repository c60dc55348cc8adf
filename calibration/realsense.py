"""RealSense input for the calibration commands: recordings (.db3/.bag) and live cameras.

pyrealsense2 is imported only when one of these functions runs. Recordings
are played back through the SDK (`enable_device_from_file`, not real time),
so what is tested here with `.db3` files is the same code path a camera's
stream takes; the live-camera functions (`--camera SERIAL`) could not be run
in this project's CI, which has no camera: they are untested here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.sources import SourceError
from edge.sources.recording import import_realsense
from edge.types import Intrinsics, U8Array, U16Array


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
    coeffs = tuple(float(c) for c in list(rs_intr.coeffs)[:5])
    return Intrinsics(int(rs_intr.width), int(rs_intr.height), float(rs_intr.fx),
                      float(rs_intr.fy), float(rs_intr.ppx), float(rs_intr.ppy),
                      coeffs)  # type: ignore[arg-type]


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
def _pipeline(rs: Any, config: Any, what: str, playback: bool) -> Iterator[tuple[Any, Any]]:
    pipe = rs.pipeline()
    try:
        profile = pipe.start(config)
    except RuntimeError as exc:
        raise SourceError(f"{what}: cannot open it ({exc})") from None
    try:
        if playback:
            profile.get_device().as_playback().set_real_time(False)
        yield pipe, profile
    finally:
        pipe.stop()


def _needs_align(info: StreamInfo) -> bool:
    return (info.color_intrinsics is not None and info.depth_intrinsics is not None
            and info.color_intrinsics != info.depth_intrinsics)


def read_recording(path: Path, count: int = 5, *, timeout_s: float = 5.0) -> tuple[
        StreamInfo, list[RgbdFrame]]:
    """Up to `count` frames of a recording, depth aligned to colour, and its stream info."""
    if not Path(path).is_file():
        raise SourceError(f"--recording {path}: no such file")
    rs = import_realsense()
    config = rs.config()
    config.enable_device_from_file(str(path), repeat_playback=False)
    frames: list[RgbdFrame] = []
    with _pipeline(rs, config, f"recording {path}", playback=True) as (pipe, profile):
        info = _info(rs, profile)
        align = rs.align(rs.stream.color) if _needs_align(info) else None
        playback = profile.get_device().as_playback()
        while len(frames) < count:
            if frames and playback.current_status() == rs.playback_status.stopped:
                break  # the end of the file
            ok, fs = pipe.try_wait_for_frames(int(timeout_s * 1000 if not frames else 1000))
            if not ok:
                break
            frames.append(_to_arrays(rs, fs, align))
    if not frames:
        raise SourceError(f"recording {path}: no frames in it")
    return info, frames


def recording_info(path: Path) -> StreamInfo:
    """Serial, factory intrinsics and depth scale stored in a recording."""
    info, _ = read_recording(path, count=1)
    return info


def read_camera(serial: str, count: int = 5, *, width: int = 640, height: int = 480,
                fps: int = 30, color: bool = True, depth: bool = True,
                warmup: int = 15) -> tuple[StreamInfo, list[RgbdFrame]]:
    """Frames from a live RealSense (untested here: no camera in CI)."""
    rs = import_realsense()
    config = rs.config()
    config.enable_device(serial)
    if color:
        config.enable_stream(rs.stream.color, width, height, rs.format.bgr8, fps)
    if depth:
        config.enable_stream(rs.stream.depth, width, height, rs.format.z16, fps)
    frames: list[RgbdFrame] = []
    with _pipeline(rs, config, f"camera {serial}", playback=False) as (pipe, profile):
        info = _info(rs, profile)
        align = rs.align(rs.stream.color) if color and depth else None
        for _ in range(warmup):  # auto-exposure settles
            pipe.wait_for_frames(5000)
        while len(frames) < count:
            frames.append(_to_arrays(rs, pipe.wait_for_frames(5000), align))
    return info, frames


def camera_frames(serial: str, *, width: int = 640, height: int = 480,
                  fps: int = 30) -> Iterator[tuple[StreamInfo, U8Array]]:
    """Colour frames from a live camera until the caller stops iterating (untested here)."""
    rs = import_realsense()
    config = rs.config()
    config.enable_device(serial)
    config.enable_stream(rs.stream.color, width, height, rs.format.bgr8, fps)
    with _pipeline(rs, config, f"camera {serial}", playback=False) as (pipe, profile):
        info = _info(rs, profile)
        while True:
            frame = _to_arrays(rs, pipe.wait_for_frames(5000), None)
            if frame.color is not None:
                yield info, frame.color
