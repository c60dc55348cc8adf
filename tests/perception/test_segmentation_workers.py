"""Item finding in worker processes: the same detections as in one thread, in order, and
nothing lost or left behind when a worker or the node dies."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edge.capture.sync import FrameSynchronizer
from edge.catalogue import load_catalogue
from edge.config import CameraConfig, load_config
from edge.perception.segmentation import Detection, ItemSegmenter
from edge.perception.segmentation_child import unwire, wire
from edge.perception.segmentation_workers import ItemSearchError, SegmentationWorkers
from edge.sim.conveyor import SyntheticConveyor, default_intrinsics, default_pose
from edge.types import FrameSet

CFG = load_config(None)
CAMS = ("top", "angled")
SHM = Path("/dev/shm")


@pytest.fixture(scope="module")
def world() -> SyntheticConveyor:
    syn = dataclasses.replace(CFG.synthetic, items_per_second=3.0, seed=5)
    return SyntheticConveyor(syn, CFG.belt, [CameraConfig(id=c) for c in CAMS],
                             load_catalogue(), 1.7e12)


@pytest.fixture(scope="module")
def framesets(world: SyntheticConveyor) -> list[FrameSet]:
    """2.7 s of belt with items in view, both cameras, every third frame (10 fps)."""
    sync = FrameSynchronizer(CAMS, fps=10)
    out: list[FrameSet] = []
    for k in range(60, 140, 3):
        for cam in CAMS:
            out += sync.push(world.render(cam, k))
    return out + sync.flush()


@pytest.fixture
def segmenters(world: SyntheticConveyor) -> dict[str, ItemSegmenter]:
    return {c: ItemSegmenter(c, world.intrinsics(c), world.camera_pose(c), CFG.items)
            for c in CAMS}


def _key(det: Detection) -> tuple[object, ...]:
    return (det.camera_id, det.timestamp_ms, det.box_mm, det.centre_mm, det.yaw_rad, det.roi,
            det.mask.tobytes(), det.complete, det.merged)


def _run_all(pool: SegmentationWorkers, framesets: list[FrameSet],
             between: object = None) -> list[dict[str, list[Detection]]]:
    out = []
    for i, fs in enumerate(framesets):
        while pool.full:
            ticket = pool.collect(10.0)
            assert ticket is not None
            out.append(pool.detections(ticket))
        pool.submit(fs)
        if callable(between):
            between(i)
    while pool.pending:
        ticket = pool.collect(10.0)
        assert ticket is not None
        out.append(pool.detections(ticket))
    return out


def test_workers_find_exactly_what_one_thread_finds_in_order(
        framesets: list[FrameSet], segmenters: dict[str, ItemSegmenter]) -> None:
    """Every detection (box, pose, mask, flags) equals the in-thread one, framesets come back
    in submission order and each detection carries the node's own frame object."""
    expected = [{c: segmenters[c].detect(f) for c, f in fs.frames.items()} for fs in framesets]
    assert sum(len(d) for e in expected for d in e.values()) > 20  # items were in view
    pool = SegmentationWorkers(segmenters, CFG.items, 2)
    try:
        got = _run_all(pool, framesets)
        assert pool.counters()["jobs"] == sum(len(fs.frames) for fs in framesets)
    finally:
        pool.close()
    assert len(got) == len(framesets)
    for fs, want, have in zip(framesets, expected, got, strict=True):
        assert set(have) == set(want)
        for cam in want:
            assert [_key(d) for d in have[cam]] == [_key(d) for d in want[cam]]
            assert all(d.frame is fs.frames[cam] for d in have[cam])


def test_depth_captured_into_the_shared_slots_reaches_the_workers_without_a_copy(
        framesets: list[FrameSet], segmenters: dict[str, ItemSegmenter]) -> None:
    """Frames whose depth a camera wrote into `depth_pool` are searched where they lie (no
    ring copy), others are copied; detections are the in-thread ones either way, and a slot
    comes back for new frames only once its frame is let go."""
    expected = [{c: [_key(d) for d in segmenters[c].detect(f)] for c, f in fs.frames.items()}
                for fs in framesets]
    pool = SegmentationWorkers(segmenters, CFG.items, 2, frame_slots=8)
    try:
        shared = []
        for i, fs in enumerate(framesets):
            if i % 3 == 2:  # every third frameset stays in ordinary memory
                shared.append(fs)
                continue
            frames = {}
            for cam, f in fs.frames.items():
                depth_pool = pool.depth_pool(cam)
                assert depth_pool is not None
                depth = depth_pool.take()
                np.copyto(depth, f.depth)
                frames[cam] = dataclasses.replace(f, depth=depth)
            shared.append(dataclasses.replace(fs, frames=frames))
        # 8 slots per camera, 18 framesets in slots: the rest did not fit
        assert pool.depth_pool("top").slots_exhausted > 0  # type: ignore[union-attr]
        got = _run_all(pool, shared)
        counters = pool.counters()
    finally:
        pool.close()
    assert [{c: [_key(d) for d in v] for c, v in g.items()} for g in got] == expected
    assert counters["frames_shared"] == 2 * 8
    assert counters["frames_copied"] == sum(len(fs.frames) for fs in framesets) - 16


def test_a_killed_worker_is_replaced_and_no_frame_is_lost(
        framesets: list[FrameSet], segmenters: dict[str, ItemSegmenter]) -> None:
    """SIGKILL one worker mid-run: the jobs it held are done in the caller, a new worker takes
    its place, and every frameset still comes back with the right detections."""
    expected = [{c: [_key(d) for d in segmenters[c].detect(f)] for c, f in fs.frames.items()}
                for fs in framesets]
    pool = SegmentationWorkers(segmenters, CFG.items, 2)
    victim = pool.worker_pids()[0]

    def kill_once(i: int) -> None:
        if i == 5:
            os.kill(victim, signal.SIGKILL)

    try:
        got = _run_all(pool, framesets, kill_once)
        counters = pool.counters()
        pids = pool.worker_pids()
    finally:
        pool.close()
    assert [{c: [_key(d) for d in v] for c, v in g.items()} for g in got] == expected
    assert counters["respawns"] == 1
    assert victim not in pids
    assert len(pids) == 2


def test_a_worker_that_cannot_be_replaced_leaves_the_pool_and_no_frame_is_lost(
        framesets: list[FrameSet], segmenters: dict[str, ItemSegmenter],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Both workers die and no new one starts (the interpreter is now /bin/false): each leaves
    the pool, their jobs and every later frameset are searched in the caller, and every
    frameset still comes back with the right detections, in order."""
    expected = [{c: [_key(d) for d in segmenters[c].detect(f)] for c, f in fs.frames.items()}
                for fs in framesets]
    pool = SegmentationWorkers(segmenters, CFG.items, 2)
    first, second = pool.worker_pids()
    monkeypatch.setattr(sys, "executable", "/bin/false")

    def kill_both(i: int) -> None:
        if i in (5, 12):
            os.kill(first if i == 5 else second, signal.SIGKILL)

    try:
        got = _run_all(pool, framesets, kill_both)
        counters = pool.counters()
    finally:
        pool.close()
    assert [{c: [_key(d) for d in v] for c, v in g.items()} for g in got] == expected
    assert counters["workers"] == 0
    assert counters["respawns"] == 0
    assert counters["jobs_done_here"] >= sum(len(fs.frames) for fs in framesets[13:])


_FAULT = """
from edge.perception import segmentation as items

_detect = items.ItemSegmenter.detect


def detect(self, frame):
    if frame.timestamp_ms == {timestamp!r}:
        raise ValueError("injected: unreadable frame")
    return _detect(self, frame)


items.ItemSegmenter.detect = detect
"""


def test_a_frameset_whose_search_raises_in_a_worker_costs_only_that_frameset(
        framesets: list[FrameSet], segmenters: dict[str, ItemSegmenter], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker's `detect` raises on one frame (injected through sitecustomize in the workers
    only): that frameset comes back with the error, the ones after it with their detections,
    and the pool keeps both workers (it used to wait for the failed job for ever)."""
    expected = [{c: [_key(d) for d in segmenters[c].detect(f)] for c, f in fs.frames.items()}
                for fs in framesets]
    bad = 6
    (tmp_path / "sitecustomize.py").write_text(
        _FAULT.format(timestamp=framesets[bad].frames["top"].timestamp_ms))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p))
    pool = SegmentationWorkers(segmenters, CFG.items, 2)
    got: list[object] = []

    def take() -> None:
        ticket = pool.collect(10.0)
        assert ticket is not None
        try:
            got.append({c: [_key(d) for d in v] for c, v in pool.detections(ticket).items()})
        except ItemSearchError as exc:
            got.append(str(exc))

    try:
        for fs in framesets:
            while pool.full:
                take()
            pool.submit(fs)
        while pool.pending:
            take()
        counters = pool.counters()
    finally:
        pool.close()
    assert isinstance(got[bad], str)
    assert "ValueError: injected: unreadable frame" in got[bad]
    assert got[:bad] + got[bad + 1:] == expected[:bad] + expected[bad + 1:]
    assert counters["workers"] == 2
    assert counters["respawns"] == 0


def test_close_stops_the_workers_and_removes_the_ring(
        segmenters: dict[str, ItemSegmenter]) -> None:
    """After close() no worker process and no depth ring in /dev/shm is left."""
    before = set(SHM.glob("cv-depth-ring-*"))
    pool = SegmentationWorkers(segmenters, CFG.items, 2)
    pids = pool.worker_pids()
    assert len(set(SHM.glob("cv-depth-ring-*")) - before) == 1
    pool.close()
    assert set(SHM.glob("cv-depth-ring-*")) - before == set()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid)


def test_workers_ignore_sigterm_and_leave_when_the_node_is_killed(tmp_path: Path) -> None:
    """systemd sends SIGTERM to the whole cgroup: workers keep serving until the node closes
    them. A node that is SIGKILLed leaves no worker behind, and the next node removes its
    depth ring."""
    script = textwrap.dedent("""
        import sys, time
        from edge.config import load_config
        from edge.perception.segmentation import ItemSegmenter
        from edge.perception.segmentation_workers import SegmentationWorkers
        from edge.sim.conveyor import default_intrinsics, default_pose
        cfg = load_config(None)
        segs = {c: ItemSegmenter(c, default_intrinsics(640, 480), default_pose(i), cfg.items)
                for i, c in enumerate(("top", "angled"))}
        pool = SegmentationWorkers(segs, cfg.items, 2)
        print(" ".join(map(str, pool.worker_pids())), flush=True)
        time.sleep(60)
    """)
    node = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    try:
        assert node.stdout is not None
        pids = [int(p) for p in node.stdout.readline().split()]
        assert len(pids) == 2
        rings = list(SHM.glob(f"cv-depth-ring-{node.pid}-*"))
        assert len(rings) == 1
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.5)
        assert all(Path(f"/proc/{pid}").exists() and not _zombie(pid) for pid in pids)
        node.kill()
        node.wait(5)
        end = time.monotonic() + 10.0
        while time.monotonic() < end and any(_alive(p) for p in pids):
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids), "workers outlived their node"
    finally:
        node.kill()
        node.wait(5)
    assert rings[0].exists()  # killed: nobody cleaned up yet
    segs = {"top": ItemSegmenter("top", default_intrinsics(640, 480), default_pose(0),
                                 CFG.items)}
    SegmentationWorkers(segs, CFG.items, 1).close()
    assert not rings[0].exists()


def test_a_worker_that_cannot_start_fails_the_start_and_leaves_nothing_behind(
        segmenters: dict[str, ItemSegmenter], monkeypatch: pytest.MonkeyPatch) -> None:
    """If a worker dies before it is ready (here: the interpreter is /bin/false), the node's
    start fails with a message saying so, and no worker or ring is left behind."""
    before = set(SHM.glob("cv-depth-ring-*"))
    monkeypatch.setattr(sys, "executable", "/bin/false")
    with pytest.raises(RuntimeError, match="exited at start"):
        SegmentationWorkers(segmenters, CFG.items, 2)
    assert set(SHM.glob("cv-depth-ring-*")) == before


def test_a_frame_that_does_not_fit_the_calibration_is_refused_by_camera(
        framesets: list[FrameSet], segmenters: dict[str, ItemSegmenter]) -> None:
    fs = framesets[0]
    small = dataclasses.replace(fs.frames["top"], depth=np.zeros((240, 320), np.uint16))
    pool = SegmentationWorkers(segmenters, CFG.items, 1)
    try:
        with pytest.raises(ValueError, match="camera top: frame is 320x240"):
            pool.submit(FrameSet(fs.timestamp_ms, {"top": small}))
    finally:
        pool.close()


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and not _zombie(pid)


@settings(max_examples=60, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 37), st.integers(1, 41))),
       st.floats(-1e3, 1e3, allow_nan=False))
def test_a_detection_crosses_the_process_boundary_unchanged(mask: np.ndarray,
                                                            x: float) -> None:
    """Masks travel packed 8 pixels a byte, whatever their shape (padding of the last byte
    included); the numbers travel as they are."""
    frame = object()
    det = Detection(camera_id="top", timestamp_ms=1.5, centre_mm=(x, -x),
                    box_mm=(3.0, 2.0, 1.0), yaw_rad=0.25, extent_x_mm=(x - 1, x + 1),
                    extent_y_mm=(-x - 1, -x + 1), roi=(4, 5, 4 + mask.shape[1], 5 + mask.shape[0]),
                    mask=mask, complete=True, merged=False, frame=frame)  # type: ignore[arg-type]
    back = unwire(wire(det), frame)  # type: ignore[arg-type]
    assert back.mask.dtype == np.bool_
    assert back.mask.shape == mask.shape
    assert np.array_equal(back.mask, mask)
    assert dataclasses.replace(back, mask=mask) == dataclasses.replace(det, mask=mask)
