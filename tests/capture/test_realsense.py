"""RealSenseSource through real pyrealsense2 playback: frames, filters, faults, bad input."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from edge.capture import _rs_session as rs_session
from edge.capture import realsense
from edge.capture.realsense import RealSenseSource, RetryPolicy
from edge.capture.recording import write_recording
from edge.capture.source import EndOfStream, FrameSource, SourceError
from edge.capture.sync import FrameSynchronizer
from edge.catalogue import load_catalogue
from edge.config import CameraConfig, DepthFilters, load_config
from edge.perception.induct import InductAssociator
from edge.perception.segmentation import ItemSegmenter
from edge.perception.tracking import ItemTracker
from edge.sim.conveyor import SyntheticConveyor
from edge.types import Frame, Intrinsics, ItemRecord

if TYPE_CHECKING:
    from pathlib import Path

pytest.importorskip("pyrealsense2")

INTR = Intrinsics(64, 48, 50.0, 50.0, 31.5, 23.5)
CFG = load_config(None)


def small_frames(n: int) -> list[Frame]:
    rng = np.random.default_rng(2)
    return [Frame("cam", i, 1.7e12 + i * 100.0, rng.integers(0, 255, (48, 64, 3), np.uint8),
                  rng.integers(500, 1500, (48, 64), np.uint16), 0.001, INTR) for i in range(n)]


def read_all(src: FrameSource) -> list[Frame]:
    out: list[Frame] = []
    src.start()
    try:
        while True:
            f = src.read(2.0)
            if f is not None:
                out.append(f)
    except EndOfStream:
        pass
    finally:
        src.stop()
    return out


@pytest.fixture(scope="module")
def small_db3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rec") / "small.db3"
    write_recording(path, small_frames(30), fps=10, serial="SN-1")
    return path


def test_playback_delivers_every_frame_as_written(small_db3: Path) -> None:
    """Not real time: all 30 frames, in order, byte-equal, with timestamps, intrinsics, depth
    scale and serial read from the recording; counters say 30 received, nothing dropped."""
    src = RealSenseSource("top", recording=small_db3, width=64, height=48, fps=10)
    got = read_all(src)
    want = small_frames(30)
    assert [f.index for f in got] == list(range(30))
    for g, w in zip(got, want, strict=True):
        assert g.camera_id == "top"
        assert g.timestamp_ms == pytest.approx(w.timestamp_ms)
        assert np.array_equal(g.color, w.color)
        assert np.array_equal(g.depth, w.depth)
        assert g.intrinsics == INTR
        assert g.depth_scale_m == pytest.approx(0.001)
    assert src.counters.frames_received == 30
    assert src.counters.frames_dropped == src.counters.skewed_frames == 0


def test_a_slow_reader_loses_no_frames_and_can_stop_while_playback_waits(
        small_db3: Path) -> None:
    """Offline playback waits for a reader slower than the file (no frame skipped), and
    stop() returns promptly while the playback thread is blocked on the full syncer."""
    src = RealSenseSource("top", recording=small_db3, width=64, height=48, fps=10)
    src.start()
    got = []
    try:
        while True:
            frame = src.read(2.0)
            if frame is not None:
                got.append(frame.index)
                time.sleep(0.02)  # 30 frames play in ~5 ms: a reader this slow falls behind
    except EndOfStream:
        pass
    finally:
        src.stop()
    assert got == list(range(30))
    assert src.counters.frames_dropped == 0

    src = RealSenseSource("top", recording=small_db3, width=64, height=48, fps=10)
    src.start()
    assert src.read(2.0) is not None
    time.sleep(0.3)  # playback is now blocked on the syncer the reader stopped draining
    t0 = time.monotonic()
    src.stop()
    assert time.monotonic() - t0 < 2.0


def test_frames_let_go_are_reused_and_frames_held_are_never_overwritten(
        small_db3: Path) -> None:
    """A reader that lets each frame go gets the same few buffers back (the counter the
    metrics export stays flat); a frame it holds keeps its pixels while later frames are
    read into the pool."""
    src = RealSenseSource("top", recording=small_db3, width=64, height=48, fps=10)
    want = small_frames(30)
    src.start()
    held: Frame | None = None
    try:
        while True:
            frame = src.read(2.0)
            if frame is None:
                continue
            if frame.index == 3:
                held = frame
            del frame
    except EndOfStream:
        pass
    finally:
        src.stop()
    assert src.counters.frames_received == 30
    assert src.counters.buffers_allocated <= 6  # colour and depth, plus the held frame's
    assert held is not None
    assert np.array_equal(held.color, want[3].color)
    assert np.array_equal(held.depth, want[3].depth)


def test_decimation_halves_frames_and_scales_the_intrinsics(small_db3: Path) -> None:
    """Decimation 2: depth and colour are 32x24 and the intrinsics are INTR.scaled(0.5)."""
    src = RealSenseSource("top", recording=small_db3, width=64, height=48, fps=10,
                          filters=DepthFilters(decimation=2, spatial=True, hole_filling=True))
    got = read_all(src)
    assert len(got) == 30
    assert got[0].depth.shape == (24, 32)
    assert got[0].color.shape == (24, 32, 3)
    assert got[0].intrinsics == INTR.scaled(0.5)


def test_missing_and_corrupt_recordings_name_the_file(tmp_path: Path) -> None:
    """A missing file, random bytes and a half-written (truncated) file each raise
    SourceError naming the file and the problem."""
    missing = tmp_path / "nope.db3"
    with pytest.raises(SourceError, match=r"nope\.db3 does not exist"):
        RealSenseSource("top", recording=missing).start()
    junk = tmp_path / "junk.db3"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(SourceError, match=r"junk\.db3 cannot be opened"):
        RealSenseSource("top", recording=junk).start()


def test_truncated_recording_is_reported(tmp_path: Path, small_db3: Path) -> None:
    """A recording cut off mid-file is refused with the file name (SQLite says malformed)."""
    cut = tmp_path / "cut.db3"
    data = small_db3.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match=r"cut\.db3 cannot be opened"):
        RealSenseSource("top", recording=cut, width=64, height=48).start()


def test_recording_without_depth_is_refused(tmp_path: Path) -> None:
    """A colour-only recording raises 'has no depth stream' naming the file."""
    path = tmp_path / "colour_only.db3"
    write_recording(path, small_frames(3), fps=10, with_depth=False)
    with pytest.raises(SourceError, match=r"colour_only\.db3 has no depth stream"):
        RealSenseSource("top", recording=path, width=64, height=48).start()


def test_wrong_resolution_for_the_calibration_is_refused(small_db3: Path) -> None:
    """A 64x48 recording configured (and calibrated) for 640x480 raises naming both."""
    with pytest.raises(SourceError, match=r"small\.db3: colour stream is 64x48.*640x480"):
        RealSenseSource("top", recording=small_db3).start()


def test_an_exception_mid_stream_is_recovered_without_duplicates(
        small_db3: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK throws "Frame didn't arrive" at the 12th wait: the source re-opens the
    recording, skips what it already delivered and goes on; one reconnect is counted."""
    real_wait = rs_session.PlaybackSession.wait
    calls = {"n": 0}

    def flaky(self: Any, timeout_ms: int) -> Any:
        calls["n"] += 1
        if calls["n"] == 12:
            raise RuntimeError("Frame didn't arrive within 5000")
        return real_wait(self, timeout_ms)

    monkeypatch.setattr(rs_session.PlaybackSession, "wait", flaky)
    src = RealSenseSource("top", recording=small_db3, width=64, height=48, fps=10,
                          retry=RetryPolicy(backoff_initial_s=0.01))
    got = read_all(src)
    assert [f.index for f in got] == list(range(30))
    assert src.counters.reconnects == 1


class _Unplugged:
    """The event pyrealsense2 hands the device-change callback when a camera is unplugged:
    no new device; whether it removed the session's device is the session's `removed_by`."""

    def get_new_devices(self) -> list[Any]:
        return []


def _count_closes(session: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of the real session's close() (each call goes through to the SDK)."""
    calls: list[int] = []
    real_close = session.close

    def close() -> None:
        calls.append(1)
        real_close()

    monkeypatch.setattr(session, "close", close)
    return calls


def test_a_removed_camera_is_closed_once_and_reading_goes_on(
        small_db3: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The device-change callback reports the camera removed: the next read closes its
    session (playback stopped, sensors released; it used to be dropped still running) exactly
    once, re-opens, and delivers the rest without duplicates; stop() closes the new one."""
    changes: list[tuple[str, bool]] = []
    src = RealSenseSource("top", recording=small_db3, width=64, height=48, fps=10,
                          on_device_change=lambda cam, present: changes.append((cam, present)))
    src.start()
    got = []
    try:
        while len(got) < 5:
            frame = src.read(2.0)
            if frame is not None:
                got.append(frame.index)
        removed = src._session
        assert removed is not None
        closes = _count_closes(removed, monkeypatch)
        monkeypatch.setattr(removed, "removed_by", lambda event: True)
        src._devices_changed(_Unplugged())  # what the SDK calls on its own thread
        assert changes == [("top", False)]
        try:
            while True:
                frame = src.read(2.0)
                if frame is not None:
                    got.append(frame.index)
        except EndOfStream:
            pass
        assert closes == [1]
        assert isinstance(removed, rs_session.PlaybackSession)
        assert removed.playback.current_status() == removed.rs.playback_status.stopped
        reopened = src._session
        assert reopened is not None
        assert reopened is not removed
        reopened_closes = _count_closes(reopened, monkeypatch)
    finally:
        src.stop()
    src.stop()
    assert got == list(range(30))
    assert src.counters.reconnects == 1
    assert closes == [1]
    assert reopened_closes == [1]


def test_a_session_opened_while_the_source_stops_is_closed(
        small_db3: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """stop() from another thread while the capture thread re-opens: the session that open
    returns is closed, not left playing with nobody to stop it."""
    opened: list[rs_session.PlaybackSession] = []
    src = RealSenseSource("top", recording=small_db3, width=64, height=48, fps=10,
                          retry=RetryPolicy(backoff_initial_s=0.01))

    def open_while_stopping(*args: Any, **kwargs: Any) -> rs_session.PlaybackSession:
        session = rs_session.PlaybackSession(*args, **kwargs)
        opened.append(session)
        if len(opened) == 2:  # the re-open: the node stops the source meanwhile
            stopper = threading.Thread(target=src.stop)
            stopper.start()
            stopper.join(5.0)
        return session

    monkeypatch.setattr(realsense, "PlaybackSession", open_while_stopping)
    src.start()
    assert src.read(2.0) is not None
    src._lost.set()  # lost (removed, or failed): the next read re-opens
    assert src.read(2.0) is None
    assert len(opened) == 2
    assert src._session is None
    for session in opened:
        assert session.playback.current_status() == session.rs.playback_status.stopped


def _read_until_it_gives_up(src: RealSenseSource, reads: int = 500) -> None:
    """Read a source that delivers nothing: each read returns None until SourceError."""
    for _ in range(reads):
        assert src.read(0.05) is None


def test_live_camera_that_never_appears_backs_off_resets_then_gives_up() -> None:
    """No camera with this serial (real SDK, nothing plugged in): read() returns None while
    it retries with backoff, escalates to hardware_reset, and finally raises SourceError
    naming the serial; the process never has to restart to get here."""
    src = RealSenseSource("top", serial="000000000000",
                          retry=RetryPolicy(backoff_initial_s=0.01, backoff_max_s=0.02,
                                            resets_after=2, max_attempts=5))
    src.start()
    with pytest.raises(SourceError, match=r"camera 000000000000.*5 re-opens failed"):
        _read_until_it_gives_up(src)
    assert src.resets == 2
    src.stop()


def _times_out(self: Any, timeout_ms: int) -> Any:
    return None


def _raises(self: Any, timeout_ms: int) -> Any:
    raise RuntimeError("Frame didn't arrive within 5000")


@pytest.mark.parametrize("wait", [_times_out, _raises], ids=["times-out", "raises"])
def test_a_camera_that_opens_but_sends_nothing_is_reset_and_then_given_up_on(
        small_db3: Path, monkeypatch: pytest.MonkeyPatch, wait: Any) -> None:
    """A wedged camera: every open succeeds, no frame ever comes (each wait times out, or
    raises). Each such session counts as a failed re-open (backoff, hardware_reset, then
    SourceError); it used to be re-opened every few reads for ever, never reset."""
    monkeypatch.setattr(rs_session.PlaybackSession, "wait", wait)
    src = RealSenseSource("top", recording=small_db3, width=64, height=48, fps=10,
                          retry=RetryPolicy(backoff_initial_s=0.01, backoff_max_s=0.02,
                                            resets_after=2, max_attempts=4))
    src.start()
    with pytest.raises(SourceError, match="4 re-opens failed; last error: opened but sent no"):
        _read_until_it_gives_up(src)
    assert src.resets == 1
    assert src.counters.reconnects == 3
    src.stop()


def test_source_from_config_needs_exactly_one_of_serial_or_recording() -> None:
    """Both or neither of serial/recording is a SourceError naming the camera."""
    with pytest.raises(SourceError, match="'top'"):
        RealSenseSource("top")
    src = RealSenseSource.from_config(CameraConfig(id="x", source="realsense", serial="42"))
    assert src.serial == "42"
    assert src.recording is None


# -- the same scene through the synthetic source and through .db3 playback -------------------


def _track(frames_by_cam: dict[str, list[Frame]], world: SyntheticConveyor
           ) -> list[ItemRecord]:
    cams = tuple(frames_by_cam)
    assoc = InductAssociator(CFG.belt, CFG.items)
    for a in world.announcements_until(60_000.0):
        assoc.announce(a)
    segs = {c: ItemSegmenter(c, world.intrinsics(c), world.camera_pose(c), CFG.items)
            for c in cams}
    tracker = ItemTracker(segs, assoc, CFG.items)
    sync = FrameSynchronizer(cams, fps=10, camera_timeout_ms=300.0)
    merged = sorted((f for fs in frames_by_cam.values() for f in fs),
                    key=lambda f: f.timestamp_ms)
    records: list[ItemRecord] = []
    for f in merged:
        for fs in sync.push(f):
            records += tracker.process(fs)
    for fs in sync.flush():
        records += tracker.process(fs)
    return records + tracker.flush()


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory
          ) -> tuple[SyntheticConveyor, dict[str, list[Frame]], dict[str, Path]]:
    """A dense scene, top camera 60 frames and angled 30 (its recording stops early)."""
    cams = [CameraConfig(id="top"), CameraConfig(id="angled")]
    syn = dataclasses.replace(CFG.synthetic, items_per_second=20.0, seed=9)
    world = SyntheticConveyor(syn, CFG.belt, cams, load_catalogue(), 1.7e12)
    frames = {"top": [world.render("top", k) for k in range(0, 180, 3)],
              "angled": [world.render("angled", k) for k in range(0, 90, 3)]}
    folder = tmp_path_factory.mktemp("scene")
    paths = {}
    for cam, fs in frames.items():
        paths[cam] = folder / f"{cam}.db3"
        write_recording(paths[cam], fs, fps=10)
    return world, frames, paths


def test_playback_yields_the_same_item_records_as_the_synthetic_source(
        scene: tuple[SyntheticConveyor, dict[str, list[Frame]], dict[str, Path]]) -> None:
    """Top camera: records from the .db3 playback match the synthetic run (IDs, boxes and
    centres within 1 mm, same merged flags)."""
    world, frames, paths = scene
    direct = _track({"top": frames["top"]}, world)
    played = _track({"top": read_all(RealSenseSource("top", recording=paths["top"], fps=10))},
                    world)
    assert len(direct) >= 6
    assert [r.item_id for r in played] == [r.item_id for r in direct]
    for p, d in zip(played, direct, strict=True):
        assert p.box_mm == pytest.approx(d.box_mm, abs=1.0)
        assert p.centre_mm == pytest.approx(d.centre_mm, abs=1.0)
        assert p.merged == d.merged
        assert not p.unannounced
        assert p.truth is None
        assert d.truth is not None
        assert d.truth.item_id == d.item_id


def test_a_camera_whose_recording_ends_early_leaves_the_other_producing_items(
        scene: tuple[SyntheticConveyor, dict[str, list[Frame]], dict[str, Path]]) -> None:
    """Angled playback ends after 3 s (EndOfStream), top goes on: later items still get
    records, tied to the right IDs, saying the angled view is missing."""
    world, _, paths = scene
    played = {cam: read_all(RealSenseSource(cam, recording=p, fps=10))
              for cam, p in paths.items()}
    assert len(played["angled"]) == 30
    assert len(played["top"]) == 60
    records = _track(played, world)
    late = [r for r in records if r.views_missing == ("angled",)]
    assert late
    assert not any(r.unannounced for r in records)
    direct = {r.item_id: r for r in _track({"top": [
        world.render("top", k) for k in range(0, 180, 3)]}, world)}
    for r in late:
        assert r.item_id in direct
        assert r.box_mm == pytest.approx(direct[r.item_id].box_mm, abs=1.0)
