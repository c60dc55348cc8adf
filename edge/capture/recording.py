"""Write RealSense `.db3` recordings from frames (synthetic scenes, test fixtures).

The recording is made the way the SDK makes its own: a `software_device`
with a depth sensor (z16) and a colour sensor (bgr8 or rgb8) wrapped in an
`rs.recorder`. Intrinsics, depth units, serial number and the global
timestamp domain are stored, so `RealSenseSource` plays the file back exactly
like a camera: one recording per camera.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from edge.capture.source import SourceError

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

    from edge.types import Frame, Intrinsics

ColorFormat = Literal["bgr8", "rgb8"]
#: SQLite's largest page size; what `write_recording` repacks to by default
LARGE_PAGES = 65536


def import_realsense() -> Any:
    """pyrealsense2, or a `SourceError` that says how to get it."""
    try:
        import pyrealsense2 as rs
    except ImportError as exc:  # pragma: no cover - the dev environment has it
        raise SourceError(
            "pyrealsense2 is not installed: pip install 'conveyor-vision[realsense]' "
            f"(or build librealsense with Python bindings on Jetson): {exc}"
        ) from None
    return rs


def _rs_intrinsics(rs: Any, intr: Intrinsics) -> Any:
    out = rs.intrinsics()
    out.width, out.height = intr.width, intr.height
    out.fx, out.fy, out.ppx, out.ppy = intr.fx, intr.fy, intr.cx, intr.cy
    out.model = rs.distortion.brown_conrady
    out.coeffs = list(intr.coeffs)
    return out


def _video_stream(rs: Any, kind: str, uid: int, intr: Intrinsics, fps: int, fmt: str) -> Any:
    vs = rs.video_stream()
    vs.type = getattr(rs.stream, kind)
    vs.index, vs.uid = 0, uid
    vs.width, vs.height, vs.fps = intr.width, intr.height, fps
    vs.bpp = 2 if fmt == "z16" else 3
    vs.fmt = getattr(rs.format, fmt)
    vs.intrinsics = _rs_intrinsics(rs, intr)
    return vs


class _Writer:
    """One open recording; created from the first frame's geometry."""

    def __init__(self, rs: Any, path: Path, first: Frame, fps: int, color_format: ColorFormat,
                 serial: str | None, with_depth: bool, compress: bool) -> None:
        self.rs = rs
        self.first = first
        self.color_format = color_format
        self.with_depth = with_depth
        self.device = rs.software_device()
        self.device.register_info(rs.camera_info.name, "conveyor-vision recording")
        self.device.register_info(rs.camera_info.serial_number, serial or first.camera_id)
        color_sensor = self.device.add_sensor("RGB Camera")
        self.software_sensors = [color_sensor]
        self.color_profile = color_sensor.add_video_stream(
            _video_stream(rs, "color", 1, first.intrinsics, fps, color_format))
        if with_depth:
            depth_sensor = self.device.add_sensor("Stereo Module")
            self.software_sensors.append(depth_sensor)
            self.depth_profile = depth_sensor.add_video_stream(
                _video_stream(rs, "depth", 0, first.intrinsics, fps, "z16"))
            depth_sensor.add_read_only_option(rs.option.depth_units, first.depth_scale_m)
        self.recorder = rs.recorder(str(path), self.device, compress)
        # Frames must go through the recorder's sensors to be written.
        self.sensors = list(self.recorder.query_sensors())
        self.profiles = [self.color_profile] + ([self.depth_profile] if with_depth else [])
        for sensor, profile in zip(self.sensors, self.profiles, strict=True):
            sensor.open(profile)
            sensor.start(lambda _f: None)
        self.keepalive: list[Any] = []

    def write(self, frame: Frame) -> None:
        if frame.color.shape[:2] != self.first.color.shape[:2]:
            raise SourceError(f"frame {frame.index} of camera {frame.camera_id!r} is "
                              f"{frame.color.shape[1]}x{frame.color.shape[0]}, the recording "
                              f"started at {self.first.color.shape[1]}x{self.first.color.shape[0]}")
        color = frame.color if self.color_format == "bgr8" else frame.color[..., ::-1]
        images: list[tuple[Any, np.ndarray[Any, Any], int]] = [
            (self.color_profile, np.ascontiguousarray(color), 3)]
        if self.with_depth:
            images.append((self.depth_profile, np.ascontiguousarray(frame.depth), 2))
        for (profile, pixels, bpp), sensor in zip(images, self.software_sensors, strict=True):
            sw = self.rs.software_video_frame()
            sw.pixels = pixels
            sw.bpp = bpp
            sw.stride = pixels.shape[1] * bpp
            sw.timestamp = frame.timestamp_ms
            sw.domain = self.rs.timestamp_domain.global_time
            sw.frame_number = frame.index
            sw.profile = profile.as_video_stream_profile()
            if bpp == 2:
                sw.depth_units = frame.depth_scale_m
            self.keepalive.append(pixels)  # the SDK may read the buffer after the call returns
            sensor.on_video_frame(sw)
        del self.keepalive[:-4]

    def close(self) -> None:
        for sensor in self.sensors:
            sensor.stop()
            sensor.close()
        self.sensors.clear()
        del self.recorder


def write_recording(path: Path, frames: Iterable[Frame], fps: int, *,
                    color_format: ColorFormat = "bgr8", serial: str | None = None,
                    with_depth: bool = True, compress: bool = True,
                    page_size: int | None = LARGE_PAGES) -> int:
    """Write `frames` (one camera) to a RealSense `.db3` file; returns the frame count.

    `serial` is stored as the device serial (default: the camera ID);
    `with_depth=False` writes a colour-only file (to test rejection of such files);
    `compress=False` stores raw frames: twice the size, but playback then costs what a live
    camera costs instead of LZ4 decoding (6 ms of CPU per 640x480 frame here);
    `page_size` rewrites the file with SQLite pages of that many bytes once it is written
    (`None` keeps the recorder's 4 kB). A 640x480 frame is 1.5 MB: with 4 kB pages the SDK
    reads it back in ~375 chained page reads, with 64 kB pages in ~24, which cut its
    playback CPU by a quarter to a third here. The file stays a plain rosbag2 `.db3`.
    """
    if page_size is not None:
        _check_page_size(page_size)
    rs = import_realsense()
    writer: _Writer | None = None
    count = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        for frame in frames:
            if writer is None:
                writer = _Writer(rs, path, frame, fps, color_format, serial, with_depth,
                                 compress)
            writer.write(frame)
            count += 1
    except (RuntimeError, SourceError) as exc:
        raise SourceError(f"cannot write recording {path}: {exc}") from exc
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise SourceError(f"cannot write recording {path}: no frames given")
    if page_size is not None:
        repack_recording(path, page_size)
    return count


def _check_page_size(page_size: int) -> None:
    if page_size < 512 or page_size > LARGE_PAGES or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two from 512 to {LARGE_PAGES}, "
                         f"not {page_size}")


def repack_recording(path: Path, page_size: int) -> None:
    """Rewrite the recording's SQLite file with `page_size`-byte pages (VACUUM in place)."""
    _check_page_size(page_size)
    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute(f"PRAGMA page_size = {page_size}")
        con.execute("VACUUM")
        got = con.execute("PRAGMA page_size").fetchone()[0]
    except sqlite3.Error as exc:
        raise SourceError(f"cannot repack recording {path}: {exc}") from exc
    finally:
        con.close()
    # SQLite ignores the pragma in WAL mode; rosbag2 files use a rollback journal.
    if got != page_size:
        raise SourceError(f"cannot repack recording {path}: SQLite kept {got}-byte pages")
