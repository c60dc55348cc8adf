"""Multi-camera sync: grouping by timestamp, clock offsets, cameras that stop."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.capture.sync import FrameSynchronizer
from edge.types import Frame, FrameSet, Intrinsics

_INTR = Intrinsics(8, 6, 10.0, 10.0, 3.5, 2.5)
_PERIOD = 1000.0 / 30.0


def _frame(cam: str, index: int, t: float) -> Frame:
    return Frame(cam, index, t, np.zeros((6, 8, 3), np.uint8), np.zeros((6, 8), np.uint16),
                 0.001, _INTR)


def _run(sync: FrameSynchronizer, frames: list[Frame]) -> list[FrameSet]:
    out: list[FrameSet] = []
    for f in frames:
        out += sync.push(f)
    return out + sync.flush()


def _interleaved(offsets: dict[str, float], n: int, jitter: float = 0.0,
                 seed: int = 0) -> list[Frame]:
    rng = np.random.default_rng(seed)
    frames = [_frame(c, i, 1000.0 + i * _PERIOD + off + rng.uniform(-jitter, jitter))
              for i in range(n) for c, off in offsets.items()]
    return sorted(frames, key=lambda f: f.timestamp_ms)


def test_frames_of_the_same_instant_form_one_complete_frameset() -> None:
    """Two cameras 3 ms apart: every frameset holds frame k of both, none missing."""
    sync = FrameSynchronizer(["top", "angled"], fps=30)
    sets = _run(sync, _interleaved({"top": 0.0, "angled": 3.0}, 50))
    assert len(sets) == 50
    assert all(not fs.missing for fs in sets)
    assert all(fs.frames["top"].index == fs.frames["angled"].index for fs in sets)
    assert sync.counters.unmatched_frames == 0


def test_steady_clock_offset_is_estimated_and_removed() -> None:
    """A steady +12 ms offset (jitter 1 ms) is learnt; frameset times follow the reference."""
    sync = FrameSynchronizer(["top", "angled"], fps=30)
    sets = _run(sync, _interleaved({"top": 0.0, "angled": 12.0}, 60, jitter=1.0))
    assert sync.offset_ms("angled") == pytest.approx(12.0, abs=1.0)
    assert all(fs.frames["top"].index == fs.frames["angled"].index for fs in sets)
    assert sets[-1].timestamp_ms == pytest.approx(sets[-1].frames["top"].timestamp_ms)


def test_a_camera_that_stops_does_not_stall_the_others() -> None:
    """After camera_timeout_ms without 'angled', framesets go on with missing=('angled',)."""
    sync = FrameSynchronizer(["top", "angled"], fps=30, camera_timeout_ms=200.0)
    frames = [f for f in _interleaved({"top": 0.0, "angled": 2.0}, 90)
              if f.camera_id == "top" or f.index < 30]
    sets: list[FrameSet] = []
    for f in frames:
        sets += sync.push(f)
    # Without a flush: everything up to ~200 ms before the newest frame has gone out.
    assert len(sets) >= 90 - 7
    late = [fs for fs in sets if fs.frames["top"].index >= 30]
    assert late
    assert all(fs.missing == ("angled",) for fs in late)
    assert sync.counters.incomplete == len(late)
    assert sync.counters.unmatched_frames == len(late)


def test_without_a_timeout_a_camera_far_behind_still_gets_every_pair() -> None:
    """Recordings read as fast as possible: 'angled' delivers its 60 frames only after 'top'
    delivered all of its own; with camera_timeout_ms=inf every frameset is still complete."""
    sync = FrameSynchronizer(["top", "angled"], fps=30, camera_timeout_ms=float("inf"))
    frames = _interleaved({"top": 0.0, "angled": 2.0}, 60)
    ahead = [f for f in frames if f.camera_id == "top"]
    behind = [f for f in frames if f.camera_id == "angled"]
    sets: list[FrameSet] = []
    for f in ahead:
        sets += sync.push(f)
    assert sets == []  # nothing goes out without its partner
    for f in behind:
        sets += sync.push(f)
    sets += sync.flush()
    assert len(sets) == 60
    assert all(not fs.missing for fs in sets)
    assert sync.counters.unmatched_frames == 0


def test_a_retired_camera_is_no_longer_waited_for() -> None:
    """Without a timeout, a camera whose recording ended is retired: the frames that were
    waiting for it go out at once, naming it missing, and later ones do not wait either."""
    sync = FrameSynchronizer(["top", "angled"], fps=30, camera_timeout_ms=float("inf"))
    frames = _interleaved({"top": 0.0, "angled": 2.0}, 20)
    sets: list[FrameSet] = []
    for f in frames:
        if f.camera_id == "top" or f.index < 10:
            sets += sync.push(f)
    assert len(sets) == 10  # 'top' 10..19 wait for their partner
    sets += sync.retire("angled")
    assert len(sets) == 20
    assert all(fs.missing == ("angled",) for fs in sets[10:])
    assert sync.push(_frame("top", 20, 1000.0 + 20 * _PERIOD)) != []


def test_a_dropped_frame_is_counted_unmatched_and_the_next_pair_still_matches() -> None:
    """Camera 'angled' loses frame 10: frameset 10 misses it, 11 is complete again."""
    sync = FrameSynchronizer(["top", "angled"], fps=30)
    frames = [f for f in _interleaved({"top": 0.0, "angled": 1.0}, 20)
              if not (f.camera_id == "angled" and f.index == 10)]
    sets = _run(sync, frames)
    by_index = {fs.frames["top"].index: fs for fs in sets}
    assert by_index[10].missing == ("angled",)
    assert not by_index[11].missing
    assert sync.counters.unmatched_frames == 1


def test_frames_older_than_what_went_out_are_dropped_as_late() -> None:
    """A frame arriving after its instant was emitted is counted late, never re-emitted."""
    sync = FrameSynchronizer(["a"], fps=30)
    sync.push(_frame("a", 0, 1000.0))
    sync.push(_frame("a", 1, 1033.0))
    assert sync.push(_frame("a", 2, 900.0)) == []
    assert sync.counters.late_frames == 1


def test_every_frame_is_counted_once_complete_unmatched_or_late() -> None:
    """'angled' loses frame 5 and delivers frame 3 again after it went out: 'top' 5 goes out
    alone (1 unmatched), the stale copy is dropped (1 late); nothing is counted twice."""
    sync = FrameSynchronizer(["top", "angled"], fps=30)
    frames = [f for f in _interleaved({"top": 0.0, "angled": 1.0}, 10)
              if not (f.camera_id == "angled" and f.index == 5)]
    stale = _frame("angled", 3, 1000.0 + 3 * _PERIOD + 1.0)
    sets = [fs for f in frames[:16] for fs in sync.push(f)]
    assert any(fs.frames["top"].index == 3 for fs in sets)  # its instant went out
    assert sync.push(stale) == []
    _run(sync, frames[16:])
    c = sync.counters
    assert (c.complete, c.unmatched_frames, c.late_frames) == (9, 1, 1)
    assert 2 * c.complete + c.unmatched_frames + c.late_frames == len(frames) + 1


def test_unknown_camera_is_rejected_by_name() -> None:
    """A frame from a camera the synchronizer was not built for raises naming it."""
    sync = FrameSynchronizer(["a", "b"], fps=30)
    with pytest.raises(ValueError, match="'c'"):
        sync.push(_frame("c", 0, 0.0))


@settings(max_examples=60, deadline=None)
@given(
    # Spread 12 ms + 2 x 2 ms jitter stays inside the 16.7 ms tolerance: frames of one
    # instant can be grouped before the clock offsets are learnt (wider spreads cannot be).
    offsets=st.lists(st.floats(-6.0, 6.0), min_size=1, max_size=4),
    jitter=st.floats(0.0, 2.0),
    drop=st.lists(st.booleans(), min_size=40, max_size=40),
    seed=st.integers(0, 2**16),
)
def test_grouping_properties(offsets: list[float], jitter: float, drop: list[bool],
                             seed: int) -> None:
    """Any offsets/jitter/drops: each frame goes out exactly once, in time order, grouped by
    capture instant, and no frameset holds two frames further apart than the tolerance."""
    cams = {f"c{i}": off for i, off in enumerate(offsets)}
    frames = _interleaved(cams, 40, jitter=jitter, seed=seed)
    rng = np.random.default_rng(seed)
    kept = [f for f in frames if f.camera_id == "c0" or not drop[f.index] or rng.random() < 0.5]
    sync = FrameSynchronizer(list(cams), fps=30)
    sets = _run(sync, kept)
    emitted = [(f.camera_id, f.index) for fs in sets for f in fs.frames.values()]
    assert sorted(emitted) == sorted((f.camera_id, f.index) for f in kept)
    stamps = [fs.timestamp_ms for fs in sets]
    assert stamps == sorted(stamps)
    for fs in sets:
        assert len({f.index for f in fs.frames.values()}) == 1
        assert set(fs.missing) | set(fs.frames) == set(cams)
        corrected = [sync.corrected_ms(f) for f in fs.frames.values()]
        assert max(corrected) - min(corrected) <= sync.tolerance_ms + 1e-9


def test_default_tolerance_is_half_a_frame_period_from_config() -> None:
    """From the default config (two cameras at 30 fps): tolerance 16.7 ms, timeout 500 ms."""
    from edge.config import load_config

    cfg = load_config(None)
    sync = FrameSynchronizer.from_config(cfg.cameras, cfg.sync)
    assert sync.camera_ids == ("top", "angled")
    assert sync.tolerance_ms == pytest.approx(1000.0 / 30 / 2)
    assert sync.camera_timeout_ms == cfg.sync.camera_timeout_ms
