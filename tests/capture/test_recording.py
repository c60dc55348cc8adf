"""Writing RealSense .db3 recordings from frames, checked by reading them back with the SDK."""

from __future__ import annotations

import queue
import sqlite3
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from edge.capture.recording import write_recording
from edge.capture.source import SourceError
from edge.types import Frame, Intrinsics

if TYPE_CHECKING:
    from pathlib import Path

rs = pytest.importorskip("pyrealsense2")

INTR = Intrinsics(64, 48, 55.0, 56.0, 31.2, 23.8, (0.01, -0.02, 0.0, 0.0, 0.001))


def frames(n: int, scale: float = 0.001) -> list[Frame]:
    rng = np.random.default_rng(1)
    return [Frame("cam", i, 1.7e12 + i * 33.3,
                  rng.integers(0, 255, (48, 64, 3), dtype=np.uint8),
                  rng.integers(300, 1500, (48, 64), dtype=np.uint16), scale, INTR)
            for i in range(n)]


def read_raw(path: Path) -> tuple[Any, dict[str, list[tuple[float, np.ndarray]]]]:
    """Every frame of every stream, straight from the SDK's playback device."""
    dev = rs.context().load_device(str(path))
    playback = dev.as_playback()
    playback.set_real_time(False)
    got: queue.Queue[Any] = queue.Queue()
    sensors = dev.query_sensors()
    for s in sensors:
        s.open(s.get_stream_profiles()[0])
    out: dict[str, list[tuple[float, np.ndarray]]] = {}

    def on_frame(f: Any) -> None:
        got.put((f.get_profile().stream_type().name, f.get_timestamp(),
                 np.asanyarray(f.get_data()).copy()))

    playback.pause()
    for s in sensors:
        s.start(on_frame)
    playback.resume()
    while True:
        try:
            kind, ts, data = got.get(timeout=1.0)
        except queue.Empty:
            break
        out.setdefault(kind, []).append((ts, data))
    for s in sensors:
        s.stop()
        s.close()
    return dev, out


def test_recording_round_trips_pixels_timestamps_and_intrinsics(tmp_path: Path) -> None:
    """Colour (bgr8) and depth (z16) come back byte for byte, with the global-time timestamps,
    the serial, the intrinsics and the depth units that were written."""
    src = frames(40, scale=0.0001)
    path = tmp_path / "cam.db3"
    assert write_recording(path, src, fps=30, serial="123456") == 40
    dev, streams = read_raw(path)
    assert dev.get_info(rs.camera_info.serial_number) == "123456"
    assert len(streams["color"]) == len(streams["depth"]) == 40
    for f, (ts, color), (_, depth) in zip(src, streams["color"], streams["depth"], strict=True):
        assert ts == pytest.approx(f.timestamp_ms)
        assert np.array_equal(color, f.color)
        assert np.array_equal(depth, f.depth)
    depth_sensor = next(s for s in dev.query_sensors() if s.is_depth_sensor())
    assert depth_sensor.as_depth_sensor().get_depth_scale() == pytest.approx(0.0001)
    profile = depth_sensor.get_stream_profiles()[0].as_video_stream_profile()
    intr = profile.get_intrinsics()
    assert (intr.width, intr.height) == (64, 48)
    assert (intr.fx, intr.fy, intr.ppx, intr.ppy) == pytest.approx((55.0, 56.0, 31.2, 23.8))
    assert list(intr.coeffs) == pytest.approx(list(INTR.coeffs))


def test_uncompressed_recordings_are_raw_and_round_trip(tmp_path: Path) -> None:
    """compress=False stores the frames raw (noise does not compress: at least the pixel
    bytes on disk) and they come back byte for byte, like the default LZ4 recordings."""
    src = frames(20)
    raw, packed = tmp_path / "raw.db3", tmp_path / "lz4.db3"
    write_recording(raw, src, fps=30, compress=False)
    write_recording(packed, src, fps=30)
    pixel_bytes = sum(f.color.nbytes + f.depth.nbytes for f in src)
    assert raw.stat().st_size >= pixel_bytes
    for path in (raw, packed):
        _, streams = read_raw(path)
        assert [d for _, d in streams["depth"]][5].tobytes() == src[5].depth.tobytes()
        assert np.array_equal(streams["color"][19][1], src[19].color)


def _page_size(path: Path) -> int:
    con = sqlite3.connect(path)
    try:
        return int(con.execute("PRAGMA page_size").fetchone()[0])
    finally:
        con.close()


def test_recordings_use_64k_pages_and_play_back_like_the_recorders_own(tmp_path: Path) -> None:
    """By default the file is repacked to 64 kB SQLite pages (cheaper playback); the SDK
    plays it back frame for frame like the recorder's own 4 kB-page file."""
    src = frames(12)
    big, small = tmp_path / "big.db3", tmp_path / "small.db3"
    write_recording(big, src, fps=30, compress=False)
    write_recording(small, src, fps=30, compress=False, page_size=None)
    assert (_page_size(big), _page_size(small)) == (65536, 4096)
    a, b = read_raw(big)[1], read_raw(small)[1]
    assert set(a) == set(b) == {"color", "depth"}
    for kind in a:
        assert [t for t, _ in a[kind]] == [t for t, _ in b[kind]]
        assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a[kind], b[kind], strict=True))


def test_a_page_size_sqlite_cannot_use_is_refused_before_writing(tmp_path: Path) -> None:
    """SQLite pages are powers of two from 512 to 65536 bytes; anything else is a ValueError
    raised before a file is made."""
    for bad in (1000, 256, 131072):
        with pytest.raises(ValueError, match="power of two"):
            write_recording(tmp_path / "x.db3", frames(2), fps=30, page_size=bad)
    assert not (tmp_path / "x.db3").exists()


def test_rgb8_recordings_store_rgb_order(tmp_path: Path) -> None:
    """color_format='rgb8' writes the channels swapped, as a camera set to RGB would."""
    src = frames(3)
    path = tmp_path / "rgb.db3"
    write_recording(path, src, fps=30, color_format="rgb8")
    _, streams = read_raw(path)
    assert np.array_equal(streams["color"][0][1], src[0].color[..., ::-1])


def test_colour_only_recording_has_no_depth_stream(tmp_path: Path) -> None:
    """with_depth=False writes a colour-only file (used to test rejection of such files)."""
    path = tmp_path / "nodepth.db3"
    write_recording(path, frames(3), fps=30, with_depth=False)
    _, streams = read_raw(path)
    assert set(streams) == {"color"}


def test_no_frames_or_changing_size_is_an_error_naming_the_file(tmp_path: Path) -> None:
    """An empty frame list or a frame of another size raises SourceError with the path."""
    with pytest.raises(SourceError, match=r"empty\.db3.*no frames"):
        write_recording(tmp_path / "empty.db3", [], fps=30)
    bad = frames(2)
    small = Frame("cam", 2, bad[1].timestamp_ms + 33, np.zeros((24, 32, 3), np.uint8),
                  np.zeros((24, 32), np.uint16), 0.001, INTR.scaled(0.5))
    with pytest.raises(SourceError, match="32x24"):
        write_recording(tmp_path / "sizes.db3", [*bad, small], fps=30)
