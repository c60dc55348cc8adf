"""Item finding and tracking: from synthetic RGB-D frames to one record per physical item."""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass

import pytest

from edge.capture.sync import FrameSynchronizer
from edge.catalogue import load_catalogue
from edge.config import CameraConfig
from edge.perception.induct import InductAssociator
from edge.perception.segmentation import Detection, ItemSegmenter
from edge.perception.tracking import ItemTracker
from edge.sim.conveyor import SyntheticConveyor
from edge.types import FrameSet, ItemRecord
from tests.conftest import LONG_CHECKS
from tests.perception.helpers import CFG, START_MS


@dataclass
class RunResult:
    records: list[ItemRecord]
    expected: list[str]  # IDs of items that crossed the whole view during the run
    dims: dict[str, tuple[float, float, float]]
    touching: set[str]
    cpu_ms: list[float]
    seen: list[str]


def _world(cams: tuple[str, ...], **syn: float) -> SyntheticConveyor:
    cfg = dataclasses.replace(CFG.synthetic, **syn)
    return SyntheticConveyor(cfg, CFG.belt, [CameraConfig(id=c) for c in cams],
                             load_catalogue(), START_MS)


def _pipeline(world: SyntheticConveyor, cams: tuple[str, ...], seen: list[str]
              ) -> tuple[ItemTracker, InductAssociator]:
    assoc = InductAssociator(CFG.belt, CFG.items, on_seen=lambda i, _t: seen.append(i))
    segs = {c: ItemSegmenter(c, world.intrinsics(c), world.camera_pose(c), CFG.items)
            for c in cams}
    return ItemTracker(segs, assoc, CFG.items), assoc


def run_world(world: SyntheticConveyor, cams: tuple[str, ...], frames: int, step: int,
              stop_camera: tuple[str, int] | None = None) -> RunResult:
    """Render every `step`-th frame of `cams`, sync, track; `stop_camera` dies at a frame."""
    seen: list[str] = []
    tracker, assoc = _pipeline(world, cams, seen)
    sync = FrameSynchronizer(cams, fps=30 / step, camera_timeout_ms=300.0)
    announced: set[str] = set()
    records: list[ItemRecord] = []
    for k in range(0, frames, step):
        for a in world.announcements_until(k * 1000.0 / 30):
            if a.item_id not in announced:
                announced.add(a.item_id)
                assoc.announce(a)
        for cam in cams:
            if stop_camera and cam == stop_camera[0] and k >= stop_camera[1]:
                continue
            for fs in sync.push(world.render(cam, k)):
                records += tracker.process(fs)
    for fs in sync.flush():
        records += tracker.process(fs)
    records += tracker.flush()
    end_ms = frames * 1000.0 / 30
    v = CFG.belt.speed_mps
    items = [it for it in world.schedule.items_until(end_ms)
             if it.x_mm(0.0, v, -2000.0) < -1300.0 and it.x_mm(end_ms, v, -2000.0) > 1300.0]
    return RunResult(records, [it.item_id for it in items],
                     {it.item_id: it.dims_mm for it in items},
                     {it.item_id for it in items if it.touching_previous}
                     | {items[i - 1].item_id for i, it in enumerate(items)
                        if i and it.touching_previous}, tracker.cpu_ms, seen)


def score(run: RunResult) -> tuple[float, float, int]:
    """(share of items with a record under their own ID, median dimension error, merged)."""
    by_id: dict[str, list[ItemRecord]] = {}
    for r in run.records:
        by_id.setdefault(r.item_id, []).append(r)
    ok, merged, errors = 0, 0, []
    for item_id in run.expected:
        recs = by_id.get(item_id, [])
        own = [r for r in recs if r.truth is not None and r.truth.item_id == item_id]
        if own and not own[0].merged:
            ok += 1
            errors += [abs(a - b) for a, b in zip(own[0].box_mm, run.dims[item_id], strict=True)]
        elif recs and recs[0].merged:  # explicit fail-safe record under its own ID
            ok += 1
            merged += 1
    return ok / len(run.expected), statistics.median(errors), merged


@pytest.mark.slow
def test_acceptance_500_items_detected_tied_and_measured() -> None:
    """>= 500 items (>= 250 in the suite; 500 with CV_LONG_CHECKS=1) at the default belt
    speed (1.2 m/s), packed as densely as the induct allows (60 mm gaps, 2 % touching), top
    camera, every 3rd frame (10 fps): >= 99.5 % get a record under their own ID (or an
    explicit merged record), median box error <= 5 mm."""
    world = _world(("top",), items_per_second=20.0, seed=3)
    begin = time.perf_counter()
    items = 500 if LONG_CHECKS else 250
    run = run_world(world, ("top",), frames=9 * items, step=3)
    elapsed = time.perf_counter() - begin
    rate, median_err, merged = score(run)
    cpu = statistics.median(run.cpu_ms)
    print(f"\nacceptance: items={len(run.expected)} rate={rate:.4f} merged={merged} "
          f"touching={len(run.touching)} median_err_mm={median_err:.2f} "
          f"cpu_ms_per_frame={cpu:.1f} elapsed_s={elapsed:.1f}")
    assert len(run.expected) >= items
    assert rate >= 0.995
    assert median_err <= 5.0
    unannounced = [r for r in run.records if r.unannounced]
    assert len(unannounced) <= 0.005 * len(run.expected)
    # Touching items are split (own IDs, own boxes) or merged, never fused into one verdict.
    for r in run.records:
        if r.truth is not None and r.truth.item_id in run.touching and not r.merged:
            assert r.box_mm[0] <= CFG.items.max_item_length_mm


def test_two_cameras_and_one_dies_mid_run() -> None:
    """Top and angled cameras at the default spacing; 'angled' dies at frame 240: every item
    still gets its record, the late ones say the angled view is missing, IDs stay right."""
    cams = ("top", "angled")
    run = run_world(_world(cams, seed=5), cams, frames=540, step=3,
                    stop_camera=("angled", 240))
    rate, median_err, _ = score(run)
    assert len(run.expected) >= 12
    assert rate == 1.0
    assert median_err <= 5.0
    both = [r for r in run.records if not r.views_missing]
    late = [r for r in run.records if r.views_missing == ("angled",)]
    assert both
    assert late
    assert all(set(r.crops) == {"top"} for r in late)
    assert all(set(r.crops) == set(cams) for r in both)
    assert sorted(run.seen) == sorted(r.item_id for r in run.records if not r.unannounced)


def test_record_crops_are_model_ready() -> None:
    """Each record's crops are crop_size squares with depth and a non-empty item mask."""
    run = run_world(_world(("top",), seed=11), ("top",), frames=180, step=3)
    assert run.records
    size = CFG.items.crop_size
    for r in run.records:
        crop = r.crops["top"]
        assert crop.color.shape == (size, size, 3)
        assert crop.height_mm.shape == (size, size)
        assert crop.has_depth
        assert crop.mask.mean() > 0.2
        assert r.deadline_ms > r.captured_ms
        assert r.truth is not None
        assert r.product_id == r.truth.product_id


def test_a_frameset_without_the_top_camera_starts_no_track_from_the_oblique_view() -> None:
    """A node behind its cameras drops frames per camera, so some framesets lack the top
    view. The oblique camera places a tall item off sideways (here: every angled view 110 mm
    off in y); its first sliver of an entering item, in a frameset without the top view,
    must not start a track: the top camera's sightings would miss that track, the angled
    ones would keep it alive, and the item would get a second, unannounced record (seen in
    the demo under load: 224 verdicts for 223 announced items)."""
    cams = ("top", "angled")
    world = _world(cams, seed=5, items_per_second=1.0, touching_rate=0.0)
    seen: list[str] = []
    tracker, assoc = _pipeline(world, cams, seen)
    records: list[ItemRecord] = []
    announced: set[str] = set()
    slivers = 0
    speed = assoc.speed_mm_per_ms

    def known(d: Detection) -> bool:
        return any(min(tr.predicted(d.timestamp_ms, speed)[1], d.extent_x_mm[1])
                   > max(tr.predicted(d.timestamp_ms, speed)[0], d.extent_x_mm[0])
                   for tr in tracker.tracks)

    for k in range(240):
        for a in world.announcements_until(k * 1000.0 / 30):
            if a.item_id not in announced:
                announced.add(a.item_id)
                assoc.announce(a)
        frames = {c: world.render(c, k) for c in cams}
        found = {c: tracker.segmenters[c].detect(f) for c, f in frames.items()}
        found["angled"] = [dataclasses.replace(
            d, centre_mm=(d.centre_mm[0], d.centre_mm[1] + 110.0),
            extent_y_mm=(d.extent_y_mm[0] + 110.0, d.extent_y_mm[1] + 110.0))
            for d in found["angled"]]
        if k > 0 and any(d.extent_x_mm[1] < -470.0 and not known(d) for d in found["angled"]):
            slivers += 1  # the top camera's frame of this instant was dropped
            fs = FrameSet(frames["angled"].timestamp_ms, {"angled": frames["angled"]},
                          missing=("top",))
            records += tracker.process(fs, {"angled": found["angled"]})
            continue
        records += tracker.process(FrameSet(frames["top"].timestamp_ms, frames), found)
    records += tracker.flush()
    assert slivers >= 3
    assert records
    assert not [r for r in records if r.unannounced]
    ids = [r.item_id for r in records]
    assert len(ids) == len(set(ids))
    assert all(r.truth is not None and r.truth.item_id == r.item_id for r in records)


@pytest.mark.slow
def test_two_camera_records_come_early_once_per_item_without_ghosts() -> None:
    """With both cameras on a busy belt, each item gets one record, emitted with the frameset
    of its best view (not when it leaves the view), and the oblique view adds no items of its
    own."""
    cams = ("top", "angled")
    world = _world(cams, items_per_second=4.0, seed=5, touching_rate=0.0)
    seen: list[str] = []
    tracker, assoc = _pipeline(world, cams, seen)
    sync = FrameSynchronizer(cams, fps=30, camera_timeout_ms=300.0)
    announced: set[str] = set()
    emitted: list[tuple[ItemRecord, float]] = []
    for k in range(450):
        for a in world.announcements_until(k * 1000.0 / 30):
            if a.item_id not in announced:
                announced.add(a.item_id)
                assoc.announce(a)
        for cam in cams:
            for fs in sync.push(world.render(cam, k)):
                emitted += [(r, fs.timestamp_ms) for r in tracker.process(fs)]
    ids = [r.item_id for r, _ in emitted]
    assert len(ids) >= 30
    assert len(ids) == len(set(ids))
    assert not [r for r, _ in emitted if r.unannounced]
    assert all(r.truth is not None and r.truth.item_id == r.item_id for r, _ in emitted)
    delays = sorted(t - r.captured_ms for r, t in emitted)
    # A record leaves with the frameset of its best view once the next frame cannot be more
    # central (30 fps here: 40 mm apart); waiting until 60 mm past the centre cost up to two
    # frames, and the first rule (out of view + 250 ms) ~0.7 s at 1.2 m/s.
    assert delays[len(delays) // 2] == 0.0
    assert delays[-1] <= 1000.0 / 30 + 1.0
