"""The pipeline's stages: capture -> sync -> items -> inference (+ decision) -> deadlines/publish.

Each stage is a small class with one `step()` (one unit of work, True when
it did something) and its own counters; `edge.pipeline.node` wires them with bounded
queues and runs each in a `StageThread`.

Backpressure policy: capture never blocks (a full frame queue drops the
frame and counts it, as a camera would; recordings played offline wait for
room instead, and for each other); sync drops framesets when the item
stage is behind (counted); items are never dropped: the item stage blocks
on the inference queue, and an item that cannot be inspected in time gets
its fail-safe verdict from the deadline scheduler.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog

from edge.capture.source import EndOfStream, FrameSource, SourceError
from edge.clock import Clock
from edge.infer.inspector import ItemInference
from edge.perception.segmentation import Detection
from edge.perception.segmentation_workers import ItemSearchError, SegmentationWorkers
from edge.pipeline.stage_thread import BoundedQueue
from edge.types import Frame, FrameSet, ItemRecord, Verdict

log = structlog.get_logger(__name__)


class ReplayLockstep:
    """Keeps recordings played offline abreast of each other.

    A camera may hand on its next frame only while it has played (frames handed on / fps)
    at most `lead_frames` frame periods more than the slowest camera still playing; the
    slowest always may, so they never wait on each other for good. Without this, the
    capture threads of a replay drift apart at random (a full shared queue takes whichever
    is woken first): the sync then holds dozens of the leader's frames waiting for their
    partners (up to 44 in 1,800-frame replays), each holding one of the item workers' frame
    slots and adding to the latency. Live cameras are not paced: they deliver in real time
    by themselves.
    """

    def __init__(self, fps: Mapping[str, float], lead_frames: float = 2.0) -> None:
        self._fps = dict(fps)
        self._lead_s = lead_frames / min(self._fps.values()) if self._fps else 0.0
        self._played: dict[str, int] = dict.fromkeys(self._fps, 0)
        self._cond = threading.Condition()
        self.waits = 0  # hand-ons that had to wait for another camera

    def _ahead(self, camera_id: str) -> bool:
        others = [n / self._fps[c] for c, n in self._played.items() if c != camera_id]
        return bool(others) and self._played[camera_id] / self._fps[camera_id] > (
            min(others) + self._lead_s)

    def wait_turn(self, camera_id: str, stop: threading.Event) -> bool:
        """Block while `camera_id` is too far ahead; False if the node stopped meanwhile."""
        with self._cond:
            if camera_id not in self._played or not self._ahead(camera_id):
                return True
            self.waits += 1
            while not stop.is_set():
                if not self._ahead(camera_id):
                    return True
                self._cond.wait(0.05)
            return False

    def played(self, camera_id: str) -> None:
        """`camera_id` handed on one more frame."""
        with self._cond:
            if camera_id in self._played:
                self._played[camera_id] += 1
                self._cond.notify_all()

    def retire(self, camera_id: str) -> None:
        """`camera_id` has ended: nobody waits for it any more."""
        with self._cond:
            self._played.pop(camera_id, None)
            self._cond.notify_all()


class CaptureStage:
    """Reads one camera; a live camera never blocks on the rest of the pipeline.

    `offline` sources (recordings played as fast as they can be read) wait for
    room instead of dropping: nothing is lost by waiting on a file; with a
    `lockstep`, they also wait for the other recordings to keep up.
    """

    def __init__(self, source: FrameSource, out: BoundedQueue[Frame], stop: threading.Event,
                 read_timeout_s: float = 0.2, *, offline: bool = False,
                 lockstep: ReplayLockstep | None = None) -> None:
        self.source = source
        self._offline = offline
        self._lockstep = lockstep
        self._out = out
        self._stop = stop
        self._timeout = read_timeout_s
        self.finished = threading.Event()
        self.failed: str | None = None
        self.last_frame_ms: float | None = None

    def step(self) -> bool:
        if self.finished.is_set():
            self._stop.wait(0.1)
            return False
        try:
            frame = self.source.read(self._timeout)
        except EndOfStream as exc:
            log.info("camera_end_of_stream", camera=self.source.camera_id, detail=str(exc))
            self._finish()
            return False
        except SourceError as exc:
            # The source retries by itself; one that gives up is reported and left alone,
            # the other cameras go on (sync proceeds without this view).
            self.failed = str(exc)
            log.error("camera_failed", camera=self.source.camera_id, error=str(exc))
            self._finish()
            return False
        if frame is None:
            return False
        self.last_frame_ms = frame.timestamp_ms
        if self._lockstep is not None and not self._lockstep.wait_turn(
                self.source.camera_id, self._stop):
            return False
        self._out.hand_on(frame, self._stop, lossless=self._offline)
        if self._lockstep is not None:
            self._lockstep.played(self.source.camera_id)
        return True

    def _finish(self) -> None:
        if self._lockstep is not None:
            self._lockstep.retire(self.source.camera_id)
        self.finished.set()


class SyncStage:
    """Groups frames of all cameras into framesets."""

    def __init__(self, synchronizer: FrameSynchronizerLike, inbox: BoundedQueue[Frame],
                 out: BoundedQueue[FrameSet], clock: Clock, stop: threading.Event, *,
                 lossless: bool = False,
                 finished: Mapping[str, threading.Event] | None = None) -> None:
        self._sync = synchronizer
        self._finished = dict(finished or {})  # camera -> its capture has ended
        self._stop = stop
        self._lossless = lossless
        self._in = inbox
        self._out = out
        self._clock = clock
        self.framesets = 0

    def step(self) -> float | bool:
        frame = self._in.get(0.05)
        t0 = time.perf_counter()  # the work, not the wait for a frame
        ready = self._sync.push(frame) if frame is not None else self._sync.poll(
            self._clock.now_ms())
        if frame is None:
            ended = [cid for cid, event in self._finished.items() if event.is_set()]
            if ended and self._in.depth() == 0:  # their last frames are through the queue
                for camera_id in ended:
                    ready += self._sync.retire(camera_id)
                    del self._finished[camera_id]
        for frameset in ready:
            self.framesets += 1
            self._out.hand_on(frameset, self._stop, lossless=self._lossless)
        return time.perf_counter() - t0 if frame is not None else False

    def flush(self) -> list[FrameSet]:
        """Shutdown: framesets of every frame still here, the queued ones included."""
        ready: list[FrameSet] = []
        while (frame := self._in.get_nowait()) is not None:
            ready += self._sync.push(frame)
        return ready + self._sync.flush()


class ItemStage:
    """Finds and tracks items, ties them to announcements, emits one record per item.

    With `workers`, segmentation runs in worker processes: up to `workers.in_flight`
    framesets are out at once and come back in order, so tracking (here, in order)
    overlaps with finding items in the next frames.
    """

    def __init__(self, tracker: ItemTrackerLike, inbox: BoundedQueue[FrameSet],
                 out: BoundedQueue[ItemRecord], stop: threading.Event,
                 on_frameset: Callable[[FrameSet], None] | None = None,
                 workers: SegmentationWorkers | None = None) -> None:
        self._tracker = tracker
        self._on_frameset = on_frameset
        self._in = inbox
        self._out = out
        self._stop = stop
        self.workers = workers
        self.records = 0
        # Records the outbox refused because the node was stopping: finish() hands them on
        # (the tracker has emitted them and will not again).
        self._unsent: list[ItemRecord] = []

    def step(self) -> float | bool:
        workers = self.workers
        if workers is None:
            frameset = self._in.get(0.05)
            if frameset is None:
                return False
            t0 = time.perf_counter()
            self._track(frameset, None)
            return time.perf_counter() - t0
        if not workers.full:
            frameset = self._in.get(0.0 if workers.pending else 0.05)
            if frameset is not None:
                t0 = time.perf_counter()
                workers.submit(frameset)
                return time.perf_counter() - t0
        if not workers.pending:
            return False
        ticket = workers.collect(0.05)
        if ticket is None:
            return False
        t0 = time.perf_counter()
        try:
            found = workers.detections(ticket)
        except ItemSearchError:
            return time.perf_counter() - t0  # that frameset is lost (logged by the pool)
        self._track(ticket.frameset, found)
        return time.perf_counter() - t0

    @property
    def in_flight(self) -> int:
        """Framesets out at the workers."""
        return self.workers.pending if self.workers is not None else 0

    def _track(self, frameset: FrameSet, found: Mapping[str, list[Detection]] | None) -> None:
        if self._on_frameset is not None:
            self._on_frameset(frameset)
        for record in self._tracker.process(frameset, found):
            self.records += 1
            if not self._out.put(record, self._stop):  # items are never dropped: backpressure
                self._unsent.append(record)

    def finish(self, queued: Sequence[FrameSet] = (), timeout_s: float = 2.0
               ) -> list[ItemRecord]:
        """Shutdown: records of every item in flight, in `queued` framesets (not yet taken
        from the inbox) or still being tracked, in time order."""
        records, self._unsent = self._unsent, []
        workers = self.workers
        if workers is not None:
            end = time.monotonic() + timeout_s
            while workers.pending:
                ticket = workers.collect(max(0.0, end - time.monotonic()))
                if ticket is None:
                    break  # workers gone: what is still out is fail-safed by the deadlines
                try:
                    found = workers.detections(ticket)
                except ItemSearchError:
                    continue  # logged by the pool; this frameset's items are in others
                records.extend(self._tracker.process(ticket.frameset, found))
        for frameset in queued:
            records.extend(self._tracker.process(frameset))
        return records + self._tracker.flush()

    def close(self) -> None:
        if self.workers is not None:
            self.workers.close()


@dataclass(frozen=True, slots=True)
class Decided:
    record: ItemRecord
    verdict: Verdict


class VerdictPolicyLike(Protocol):
    """What the inference stage needs from `edge.verdicts.policy.VerdictPolicy`."""

    def decide(self, record: ItemRecord, inference: ItemInference | None,
               now_ms: float) -> Verdict: ...


class InferenceStage:
    """Runs the models on batches of items and turns scores into verdicts.

    `policy` decides; a reload replaces it (and the models) while holding `batch_lock`, so
    that a batch is never inferred with one model set and decided with another's thresholds.
    """

    def __init__(self, infer: Callable[[Sequence[ItemRecord]], Sequence[ItemInference]],
                 policy: VerdictPolicyLike, complete: Callable[[Decided], None],
                 inbox: BoundedQueue[ItemRecord], clock: Clock, max_batch: int) -> None:
        self._infer = infer
        self.policy = policy
        self._complete = complete
        self._in = inbox
        self._clock = clock
        self._max_batch = max_batch
        self.items = 0
        self.batches = 0
        self.batch_lock = threading.Lock()

    def step(self) -> float | bool:
        first = self._in.get(0.05)
        if first is None:
            return False
        t0 = time.perf_counter()
        batch = [first]
        while len(batch) < self._max_batch:
            more = self._in.get_nowait()
            if more is None:
                break
            batch.append(more)
        self.run_batch(batch)
        return time.perf_counter() - t0

    def run_batch(self, batch: Sequence[ItemRecord]) -> None:
        """Infer, decide and complete one batch (at most `max_batch` items)."""
        with self.batch_lock:
            results = self._infer(batch)
            now = self._clock.now_ms()
            for record, result in zip(batch, results, strict=True):
                self._complete(Decided(record, self.policy.decide(record, result, now)))
        self.items += len(batch)
        self.batches += 1

    def finish(self, records: Sequence[ItemRecord], deadline_mono: float) -> int:
        """At shutdown: `records` and whatever is still queued, batch by batch, while time
        allows; returns how many were left (the scheduler's drain fail-safes them)."""
        pending = list(records)
        while (rec := self._in.get_nowait()) is not None:
            pending.append(rec)
        for i in range(0, len(pending), self._max_batch):
            if time.monotonic() > deadline_mono:
                return len(pending) - i
            self.run_batch(pending[i : i + self._max_batch])
        return 0


class FrameSynchronizerLike(Protocol):
    """What the sync stage needs from `edge.capture.sync.FrameSynchronizer`."""

    def push(self, frame: Frame) -> list[FrameSet]: ...
    def poll(self, now_ms: float) -> list[FrameSet]: ...
    def retire(self, camera_id: str) -> list[FrameSet]: ...
    def flush(self) -> list[FrameSet]: ...


class ItemTrackerLike(Protocol):
    """What the item stage needs from `edge.perception.tracking`."""

    def process(self, frameset: FrameSet, found: Mapping[str, list[Detection]] | None = None
                ) -> list[ItemRecord]: ...
    def flush(self) -> list[ItemRecord]: ...
