"""Multi-camera sync: frames from N cameras grouped into framesets by timestamp.

Each camera's timestamps are first corrected by its estimated clock offset to
the reference camera (the first one): the median of the last observed
differences between matched frames, so a steady offset disappears and a
single late frame does not move it. Framesets are then formed in time order:
the oldest pending frame opens a set, and every camera whose oldest pending
frame lies within `tolerance_ms` of it joins. A camera with nothing pending
is waited for, but only for `camera_timeout_ms` (measured on the frames'
own timeline, so replays run at any speed): after that the set goes on
without it and names it in `FrameSet.missing`. Recordings read as fast as
possible are synchronized without a timeout (`camera_timeout_ms=inf`): a
reader that falls behind is not a dead camera; a camera whose recording has
ended is `retire`d.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from edge.types import Frame, FrameSet

if TYPE_CHECKING:
    from collections.abc import Sequence

    from edge.config import CameraConfig, SyncConfig

log = structlog.get_logger(__name__)

#: Matched pairs kept per camera for the clock-offset median.
_OFFSET_WINDOW = 31


@dataclass(slots=True)
class SyncCounters:
    framesets: int = 0
    complete: int = 0
    incomplete: int = 0  # framesets with at least one camera missing
    # Disjoint: a frame is in a complete frameset, or counted in exactly one of these two.
    unmatched_frames: int = 0  # frames that went out without a partner from every camera
    late_frames: int = 0  # frames that arrived after their instant was emitted (dropped)
    offsets_ms: dict[str, float] = field(default_factory=dict)


class FrameSynchronizer:
    """Groups frames of `camera_ids` into `FrameSet`s (not thread-safe: one sync stage owns it)."""

    def __init__(self, camera_ids: Sequence[str], *, fps: float,
                 tolerance_ms: float | None = None, camera_timeout_ms: float = 500.0,
                 max_pending: int = 256) -> None:
        if not camera_ids:
            raise ValueError("FrameSynchronizer needs at least one camera")
        if len(set(camera_ids)) != len(camera_ids):
            raise ValueError(f"camera IDs must be unique, got {list(camera_ids)}")
        self.camera_ids = tuple(camera_ids)
        self.tolerance_ms = tolerance_ms if tolerance_ms is not None else 500.0 / fps
        self.camera_timeout_ms = camera_timeout_ms
        self.max_pending = max_pending
        self._pending: dict[str, deque[Frame]] = {c: deque() for c in self.camera_ids}
        self._diffs: dict[str, deque[float]] = {
            c: deque(maxlen=_OFFSET_WINDOW) for c in self.camera_ids}
        self._offset: dict[str, float] = dict.fromkeys(self.camera_ids, 0.0)
        self._stale: set[str] = set()  # timed out; not waited for until they deliver again
        self._gone: set[str] = set()  # retired: never waited for
        self._now = float("-inf")
        self._last_emitted = float("-inf")
        self.counters = SyncCounters(offsets_ms=self._offset)

    @classmethod
    def from_config(cls, cameras: Sequence[CameraConfig], sync: SyncConfig
                    ) -> FrameSynchronizer:
        """One synchronizer for the configured cameras (tolerance from the slowest camera)."""
        return cls([c.id for c in cameras], fps=min(c.fps for c in cameras),
                   tolerance_ms=sync.tolerance_ms, camera_timeout_ms=sync.camera_timeout_ms)

    def offset_ms(self, camera_id: str) -> float:
        """Estimated clock offset of a camera relative to the reference camera."""
        return self._offset[camera_id]

    def corrected_ms(self, frame: Frame) -> float:
        """A frame's timestamp on the reference camera's clock."""
        return frame.timestamp_ms - self._offset[frame.camera_id]

    def push(self, frame: Frame) -> list[FrameSet]:
        """Add a frame; returns the framesets that are now complete or timed out."""
        if frame.camera_id not in self._pending:
            raise ValueError(f"frame from unknown camera {frame.camera_id!r}; "
                             f"known: {', '.join(self.camera_ids)}")
        t = self.corrected_ms(frame)
        if t < self._last_emitted - self.tolerance_ms:
            self.counters.late_frames += 1
            return []
        queue = self._pending[frame.camera_id]
        if queue and t <= self.corrected_ms(queue[-1]):
            self.counters.late_frames += 1  # out of order or duplicate timestamp
            return []
        queue.append(frame)
        self._stale.discard(frame.camera_id)
        self._now = max(self._now, t)
        out = self._drain(self._now)
        if len(queue) > self.max_pending:  # a camera racing ahead of a stalled one
            out += self._drain(float("inf"), limit=len(queue) - self.max_pending)
        return out

    def retire(self, camera_id: str) -> list[FrameSet]:
        """A camera that will deliver no more (its recording ended, it failed): stop waiting
        for it; returns the framesets that were only waiting for it."""
        self._gone.add(camera_id)
        return self._drain(self._now)

    def poll(self, now_ms: float) -> list[FrameSet]:
        """Framesets whose missing cameras have timed out by `now_ms` (same clock as frames)."""
        self._now = max(self._now, now_ms)
        return self._drain(self._now)

    def flush(self) -> list[FrameSet]:
        """Everything still pending (end of a run)."""
        return self._drain(float("inf"))

    def _drain(self, now: float, limit: int | None = None) -> list[FrameSet]:
        out: list[FrameSet] = []
        while limit is None or len(out) < limit:
            heads = {c: q[0] for c, q in self._pending.items() if q}
            if not heads:
                break
            t0 = min(self.corrected_ms(f) for f in heads.values())
            chosen = {c: f for c, f in heads.items()
                      if self.corrected_ms(f) - t0 <= self.tolerance_ms}
            waiting = [c for c in self.camera_ids if not self._pending[c]
                       and c not in self._stale and c not in self._gone]
            if waiting and now - t0 < self.camera_timeout_ms:
                break  # a camera may still deliver this instant
            if waiting and now != float("inf"):
                log.warning("camera_sync_timeout", cameras=waiting, waited_ms=now - t0)
                self._stale.update(waiting)
            for c in chosen:
                self._pending[c].popleft()
            out.append(self._emit(chosen, t0))
        return out

    def _emit(self, chosen: dict[str, Frame], t0: float) -> FrameSet:
        missing = tuple(c for c in self.camera_ids if c not in chosen)
        self._learn_offsets(chosen)
        times = [self.corrected_ms(f) for f in chosen.values()]
        ref = self.camera_ids[0]
        stamp = self.corrected_ms(chosen[ref]) if ref in chosen else statistics.fmean(times)
        self._last_emitted = max(self._last_emitted, t0)
        c = self.counters
        c.framesets += 1
        if missing:
            c.incomplete += 1
            c.unmatched_frames += len(chosen)
        else:
            c.complete += 1
        ordered = {cid: chosen[cid] for cid in self.camera_ids if cid in chosen}
        return FrameSet(timestamp_ms=stamp, frames=ordered, missing=missing)

    def _learn_offsets(self, chosen: dict[str, Frame]) -> None:
        ref = self.camera_ids[0]
        if ref not in chosen:
            return
        t_ref = chosen[ref].timestamp_ms
        for cid, frame in chosen.items():
            if cid == ref:
                continue
            window = self._diffs[cid]
            window.append(frame.timestamp_ms - t_ref)
            if len(window) >= 3:
                self._offset[cid] = statistics.median(window)
