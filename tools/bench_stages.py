"""The `stages` run of `tools/bench_node.py`: each stage of the node alone on the same data.

Every stage reports its standalone rate and CPU per camera frame; `tools/bench.py` takes the
pipeline's limit from them.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import numpy as np
from bench_harness import Run, build_timed, wait_acked

from edge.app.cameras import open_cameras
from edge.capture.source import EndOfStream, FrameSource
from edge.clock import WallClock
from edge.perception.segmentation_workers import SegmentationWorkers
from edge.perception.tracking import ItemTracker
from edge.pipeline.node import Node
from edge.pipeline.stage_thread import BoundedQueue
from edge.pipeline.stages import Decided, ItemStage
from edge.types import Frame, FrameSet, ItemRecord


def stages(work: Path, broker: str, *, reference: bool = True
           ) -> dict[str, dict[str, object]]:
    """Each stage alone on the same data: standalone rate and CPU per camera frame; with
    `reference`, also the item stage in one thread as the sequential loop runs it."""
    run = Run()
    run.gate.set()
    node = build_timed(work, broker, run)
    n, capture = _capture(node)
    out = {"capture": capture}
    framesets, out["sync"] = _sync(node, _frames_in_order(node), n)
    records, items = _item_stage(node, framesets, n)
    if reference:  # how the sequential loop runs it (for the record, not in the limit)
        items["one_thread"] = _items_in_one_thread(node, framesets, n)
    out["items"] = items
    decided, out["inference"] = _inference(node, records, n)
    out["publish"] = _publish(node, run, decided, n)
    return out


def _read_all(source: FrameSource, keep: list[Frame] | None, count: list[int],
              lock: threading.Lock) -> None:
    """Reads one camera to its end, counting its frames (and keeping them in `keep`)."""
    while True:
        try:
            f = source.read(1.0)
        except EndOfStream:
            return
        if f is not None:
            with lock:
                count[0] += 1
                if keep is not None:
                    keep.append(f)


def _read_cameras(sources: list[FrameSource], keep: list[Frame] | None) -> int:
    """Reads every camera to its end, one reader thread per camera; the frames read."""
    count = [0]
    lock = threading.Lock()
    for s in sources:
        s.start()
    readers = [threading.Thread(target=_read_all, args=(s, keep, count, lock))
               for s in sources]
    for r in readers:
        r.start()
    for r in readers:
        r.join()
    for s in sources:
        s.stop()
    return count[0]


def _capture(node: Node) -> tuple[int, dict[str, object]]:
    """Capture alone: the camera frames read, and their rate and process CPU."""
    # One reader per camera, as in the node; process CPU, since librealsense's playback
    # threads do part of the work. Timed without keeping the frames: the node lets them go
    # after use, and keeping them all would time the page faults of a growing heap.
    t, c = time.perf_counter(), time.process_time()
    n = _read_cameras(list(node.cameras.sources.values()), None)
    capture = _rate(n, t, c, cpu_now=time.process_time())
    capture["note"] = "one reader per camera; process CPU incl. librealsense threads"
    return n, capture


def _frames_in_order(node: Node) -> list[Frame]:
    """Every camera's frames read again, untimed, in timestamp order for the later stages."""
    frames: list[Frame] = []
    _read_cameras(list(open_cameras(node.cfg, WallClock()).sources.values()), frames)
    frames.sort(key=lambda f: f.timestamp_ms)
    return frames


def _sync(node: Node, frames: list[Frame], n: int
          ) -> tuple[list[FrameSet], dict[str, object]]:
    """The synchronizer alone: the framesets it makes, and its rate and thread CPU."""
    t, c = time.perf_counter(), time.thread_time()
    framesets: list[FrameSet] = []
    for f in frames:
        framesets.extend(node.synchronizer.push(f))
    framesets.extend(node.synchronizer.flush())
    return framesets, _rate(n, t, c)


class _Feeder:
    """Hands the item stage its framesets a few at a time, each depth image already in the
    workers' frame slots, and keeps the CPU that placing it costs apart."""

    def __init__(self, framesets: list[FrameSet], inbox: BoundedQueue[FrameSet],
                 workers: SegmentationWorkers | None) -> None:
        self.pending = list(reversed(framesets))
        self.inbox = inbox
        self.workers = workers
        self.placing = 0.0  # CPU spent here putting depth where capture puts it in the node

    def refill(self) -> None:
        """Tops the stage's inbox up from the pending framesets."""
        # In the node, capture writes depth straight into the workers' frame slots (and is
        # timed as capture): the framesets get there just before the stage needs them, and
        # that copy is not the item stage's.
        c0 = time.thread_time()
        while self.pending and self.inbox.depth() < 8:
            self.inbox.put_nowait_or_drop(_in_frame_slots(self.pending.pop(), self.workers))
        self.placing += time.thread_time() - c0


def _item_stage(node: Node, framesets: list[FrameSet], n: int
                ) -> tuple[list[ItemRecord], dict[str, object]]:
    """The item stage as the node runs it: the items it finds, its rate and CPU (this thread
    plus the segmentation worker processes)."""
    workers = SegmentationWorkers(node.tracker.segmenters, node.cfg.items,
                                  node.cfg.items.workers) if node.cfg.items.workers else None
    inbox: BoundedQueue[FrameSet] = BoundedQueue("bench-framesets", len(framesets) + 1)
    outbox: BoundedQueue[ItemRecord] = BoundedQueue("bench-items", 10**6)
    stage = ItemStage(node.tracker, inbox, outbox, threading.Event(), workers=workers)
    feeder = _Feeder(framesets, inbox, workers)
    feeder.refill()
    t, c = time.perf_counter(), time.thread_time()
    w0 = workers.cpu_s() if workers is not None else 0.0
    while inbox.depth() or stage.in_flight or feeder.pending:
        stage.step()
        feeder.refill()
    records: list[ItemRecord] = []
    while (rec := outbox.get_nowait()) is not None:
        records.append(rec)
    records += stage.finish()
    w1 = workers.cpu_s() if workers is not None else 0.0
    items = _rate(n, t + feeder.placing, c,
                  cpu_now=time.thread_time() - feeder.placing + w1 - w0)
    items["note"] = (f"{node.cfg.items.workers} worker processes find items; CPU of this "
                     "thread + the workers; depth already in their frame slots, as capture "
                     "puts it in the node")
    if workers is not None:
        counts = workers.counters()
        items["depth"] = {k: counts[k] for k in ("frames_shared", "frames_copied")}
    stage.close()
    return records, items


def _items_in_one_thread(node: Node, framesets: list[FrameSet], n: int) -> dict[str, object]:
    """The item stage as the sequential loop runs it, segmentation and tracking in one
    thread, with a fresh tracker: its rate and thread CPU."""
    node.tracker = ItemTracker(node.tracker.segmenters, node.associator, node.cfg.items)
    t, c = time.perf_counter(), time.thread_time()
    for fs in framesets:
        node.tracker.process(fs)
    node.tracker.flush()
    return _rate(n, t, c)


def _inference(node: Node, records: list[ItemRecord], n: int
               ) -> tuple[list[Decided], dict[str, object]]:
    """Inference and the verdict policy in batches: the decided items, their rate and CPU."""
    decided: list[Decided] = []
    batch = node.cfg.models.max_batch
    t, c = time.perf_counter(), time.thread_time()
    for i in range(0, len(records), batch):
        part = records[i : i + batch]
        now = node.clock.now_ms()
        for rec, res in zip(part, node.inspector.infer(part), strict=True):
            decided.append(Decided(rec, node.policy.decide(rec, res, now)))
    return decided, _rate(n, t, c)


def _publish(node: Node, run: Run, decided: list[Decided], n: int) -> dict[str, object]:
    """Scheduling and publishing every verdict until acknowledged: rate and process CPU."""
    node.publisher.start()
    node.scheduler.start()
    node.publisher.wait_connected(10.0)
    t, c = time.perf_counter(), time.process_time()  # includes the MQTT client's threads
    for d in decided:
        node.scheduler.complete(d.verdict)
    wait_acked(node, run)
    publish = _rate(n, t, c, cpu_now=time.process_time())
    publish["note"] = "process CPU, includes the MQTT network thread"
    node.scheduler.stop()
    node.publisher.stop(2.0)
    return publish


def _in_frame_slots(frameset: FrameSet, workers: SegmentationWorkers | None) -> FrameSet:
    """The frameset with each depth image in the workers' shared frame slots, as a camera
    of the node captures it (unchanged without workers or a free slot)."""
    if workers is None:
        return frameset
    frames = dict(frameset.frames)
    for cam, frame in frameset.frames.items():
        pool = workers.depth_pool(cam)
        if pool is not None and pool.slot_of(frame.depth) is None:
            depth = pool.take()
            np.copyto(depth, frame.depth)
            frames[cam] = dataclasses.replace(frame, depth=depth)
    return dataclasses.replace(frameset, frames=frames)


def _rate(n: int, t0: float, c0: float, cpu_now: float | None = None) -> dict[str, object]:
    """`n` frames' rate since `t0` (wall) and CPU per frame since `c0` (this thread's CPU
    unless `cpu_now` is given)."""
    wall = time.perf_counter() - t0
    cpu = (cpu_now if cpu_now is not None else time.thread_time()) - c0
    return {"frames_per_s": round(n / max(wall, 1e-9), 1),
            "cpu_ms_per_frame": round(cpu * 1000.0 / max(n, 1), 3), "frames": n}
