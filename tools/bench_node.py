"""One measured run of the node for `tools/bench.py` (a child process per mode).

    python tools/bench_node.py MODE --workdir DIR --broker URL
    MODE: stages | sequential | pipelined | realtime

Prints one JSON line with the run's numbers.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from calibration.files import CameraCalibration, InspectionRegion
from edge.buffers import FrameBuffers
from edge.cameras import open_cameras
from edge.catalogue import load_catalogue
from edge.clock import WallClock
from edge.config import Config, config_to_mapping, load_config
from edge.infer.golden import golden_self_test
from edge.infer.models import ItemInspector
from edge.item_workers import SegmentationWorkers
from edge.node import Node, NodeHooks, stage_timings
from edge.publish.mqtt import AckedVerdict
from edge.sources import EndOfStream, FrameSource, SourceCounters
from edge.sources.recording import write_recording
from edge.sources.synthetic import SyntheticConveyor
from edge.stage import BoundedQueue
from edge.stages import Decided, ItemStage
from edge.tracking import ItemTracker
from edge.types import Frame, FrameSet, ItemRecord

FPS = 15
ITEMS_PER_SECOND = 3.0


def _base_config() -> Config:
    cfg = load_config(None)
    cams = tuple(dataclasses.replace(c, fps=FPS) for c in cfg.cameras)
    syn = dataclasses.replace(cfg.synthetic, items_per_second=ITEMS_PER_SECOND, damage_rate=0.05)
    return dataclasses.replace(cfg, cameras=cams, synthetic=syn)


def prepare(work: Path, seconds: float, seed: int) -> int:
    """Recordings, calibration files and the node config used by every child."""
    cfg = _base_config()
    syn = dataclasses.replace(cfg.synthetic, seed=seed)
    # Recorded timestamps start in the future: an offline replay faster than real time then
    # never runs into item deadlines (those are measured by the real-time run).
    world = SyntheticConveyor(syn, cfg.belt, cfg.cameras, load_catalogue(),
                              start_ms=time.time() * 1000.0 + 3_600_000.0)
    count = round(seconds * FPS)
    cams = []
    for cam in cfg.cameras:
        rec = work / f"{cam.id}.db3"
        # Uncompressed: a live camera hands over raw frames; LZ4 decoding on playback would
        # cost 6 ms of CPU per frame that no deployed node spends.
        write_recording(rec, (world.render(cam.id, k) for k in range(count)), FPS,
                        compress=False)
        cal = CameraCalibration(serial=cam.id, intrinsics=world.intrinsics(cam.id),
                                pose=world.camera_pose(cam.id),
                                region=InspectionRegion(-450.0, 450.0, -300.0, 300.0))
        cal.save(work / f"{cam.id}.calibration.yaml")
        cams.append({**config_to_mapping(cam), "source": "recording", "recording": str(rec),
                     "calibration": str(work / f"{cam.id}.calibration.yaml"),
                     "realtime": False})
    mapping = config_to_mapping(cfg)
    mapping["cameras"] = cams
    _write_config(mapping, work)
    return count


def _write_config(mapping: dict[str, Any], workdir: Path) -> None:
    """`workdir/node.yaml`: the node config `mapping` with its state kept under `workdir`."""
    mapping["storage"]["state_dir"] = str(workdir / "state")
    mapping["models"]["gallery_dir"] = str(workdir / "state" / "gallery")
    (workdir / "node.yaml").write_text(yaml.safe_dump(mapping))


def with_own_state(work: Path, name: str) -> Path:
    """A workdir whose node reads `work`'s recordings but keeps its own state (outbox,
    gallery), for runs of the node at the same time."""
    other = work / name
    other.mkdir()
    _write_config(yaml.safe_load((work / "node.yaml").read_text()), other)
    return other


class MemorySource:
    """The recorded frames of one camera, read once through `RealSenseSource` beforehand and
    replayed from memory: the same frames without the playback's decoding cost."""

    def __init__(self, inner: FrameSource) -> None:
        self._camera_id = inner.camera_id
        self._counters = SourceCounters()
        self._frames: list[Frame] = []
        inner.start()
        while True:
            try:
                frame = inner.read(1.0)
            except EndOfStream:
                break
            if frame is not None:
                self._frames.append(frame)
        inner.stop()
        self._next = 0

    @property
    def camera_id(self) -> str:
        return self._camera_id

    @property
    def counters(self) -> SourceCounters:
        return self._counters

    def start(self) -> None:
        self._next = 0

    def stop(self) -> None:
        pass

    def read(self, timeout_s: float) -> Frame | None:
        if self._next >= len(self._frames):
            raise EndOfStream(f"{self._camera_id}: replay done")
        frame = self._frames[self._next]
        self._next += 1
        self._counters.frames_received += 1
        return frame


class TimedSource:
    """Wraps a source and remembers when (wall clock) each recorded timestamp was read."""

    def __init__(self, inner: FrameSource, log: list[tuple[float, float]],
                 lock: threading.Lock, gate: threading.Event) -> None:
        self._inner = inner
        self._log = log
        self._lock = lock
        self._gate = gate

    @property
    def camera_id(self) -> str:
        return self._inner.camera_id

    @property
    def counters(self) -> SourceCounters:
        return self._inner.counters

    @property
    def frame_buffers(self) -> FrameBuffers:
        """The inner source's (AttributeError if it has none, as `HasFrameBuffers` expects)."""
        buffers: FrameBuffers = self._inner.frame_buffers  # type: ignore[attr-defined]
        return buffers

    def start(self) -> None:
        self._inner.start()

    def stop(self) -> None:
        self._inner.stop()

    def read(self, timeout_s: float) -> Frame | None:
        if not self._gate.wait(timeout_s):
            return None
        frame = self._inner.read(timeout_s)
        if frame is not None:
            with self._lock:
                bisect.insort(self._log, (frame.timestamp_ms, time.time() * 1000.0))
        return frame


@dataclasses.dataclass
class Run:
    """Wall-clock bookkeeping of one run."""

    reads: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    latencies_ms: list[float] = dataclasses.field(default_factory=list)
    #: the sources read nothing until this is set (the clock starts with the reads)
    gate: threading.Event = dataclasses.field(default_factory=threading.Event)
    first_read_ms: float | None = None
    last_ack_ms: float = 0.0
    acked: int = 0

    def on_acked(self, acked: AckedVerdict) -> None:
        now = time.time() * 1000.0
        with self.lock:
            self.acked += 1
            self.last_ack_ms = now
            if acked.captured_ms is None or not self.reads:
                return
            i = bisect.bisect_left(self.reads, (acked.captured_ms, -1.0))
            near = [self.reads[j] for j in (i - 1, i) if 0 <= j < len(self.reads)]
            _ts, wall = min(near, key=lambda r: abs(r[0] - acked.captured_ms))  # type: ignore[operator]
            self.latencies_ms.append(now - wall)


def _build(work: Path, broker: str, run: Run) -> Node:
    cfg = load_config(work / "node.yaml")
    cfg = dataclasses.replace(cfg, mqtt=dataclasses.replace(cfg.mqtt, url=broker))
    clock = WallClock()
    cameras = open_cameras(cfg, clock)
    memory = os.environ.get("CV_BENCH_REPLAY", "recording") == "memory"
    cameras.sources = {cid: TimedSource(MemorySource(s) if memory else s, run.reads, run.lock,
                                        run.gate) for cid, s in cameras.sources.items()}
    catalogue = load_catalogue()
    inspector = ItemInspector.load(cfg.models, catalogue)
    # As `edge-node run` does before READY (it also warms the backends up for either mode).
    if not golden_self_test(inspector).passed:
        raise RuntimeError("golden self-test failed")
    state = Path(cfg.storage.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    outbox = state / f"outbox-{os.getpid()}.sqlite"
    return Node(cfg, clock, cameras, inspector, catalogue, outbox_path=outbox,
                hooks=NodeHooks(on_acked=run.on_acked))


def _summary(node: Node, run: Run, wall_s: float, cpu_s: float) -> dict[str, object]:
    frames = sum(c.source.counters.frames_received for c in node.captures.values())
    lat = run.latencies_ms
    return {
        "items_per_s": round(run.acked / wall_s, 3),
        "frames_per_s": round(frames / wall_s, 2),
        "items": run.acked,
        "frames": frames,
        "wall_s": round(wall_s, 3),
        "cpu_s": round(cpu_s, 3),
        "cpu_cores_used": round(cpu_s / wall_s, 2),
        "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 1) if lat else None,
                       "p99": round(float(np.percentile(lat, 99)), 1) if lat else None,
                       "what": "frame read to broker PUBACK"},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
    }


def _wait_acked(node: Node, run: Run, timeout_s: float = 30.0) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and node.publisher.outbox_depth > 0:
        time.sleep(0.02)


def pipelined(work: Path, broker: str) -> dict[str, object]:
    run = Run()
    node = _build(work, broker, run)
    # The workers start once with the node, before the cameras: not part of the run.
    workers = SegmentationWorkers(node.tracker.segmenters, node.cfg.items,
                                  node.cfg.items.workers) if node.cfg.items.workers else None
    node.item_stage.workers = workers
    node.start()
    node.publisher.wait_connected(10.0)
    # The clock starts when the cameras may deliver, as for the sequential loop: the node's
    # start-up (threads, broker connection, opening the recordings) is not throughput.
    w0 = workers.cpu_s() if workers is not None else 0.0
    cpu0, t0 = time.process_time(), time.time()
    run.gate.set()
    while not all(c.finished.is_set() for c in node.captures.values()):
        time.sleep(0.02)
    # Drain: every queue empty and nothing left in inference.
    while (node.frames_q.depth() or node.framesets_q.depth() or node.item_stage.in_flight
           or node.items_q.depth()):
        time.sleep(0.01)
    time.sleep(0.2)
    _wait_acked(node, run)
    wall = (run.last_ack_ms / 1000.0) - t0
    # The item-finding worker processes' CPU counts too.
    cpu = time.process_time() - cpu0 + (workers.cpu_s() - w0 if workers is not None else 0.0)
    out = _summary(node, run, wall, cpu)
    out["stage_ms_median"] = {k: round(v, 2) for k, v in stage_timings(node).items()}
    out["queue_drops"] = {q.name: q.dropped for q in node._queues()}
    if workers is not None:
        out["item_workers"] = {**workers.counters(), "cpu_s": round(workers.cpu_s(), 3),
                               "peak_rss_mb": round(workers.peak_rss_mb(), 1)}
        out["peak_rss_mb_with_workers"] = round(
            float(out["peak_rss_mb"]) + workers.peak_rss_mb(), 1)  # type: ignore[arg-type]
    node.stop()
    return out


def _sequential_step(node: Node, frame: Frame) -> None:
    for fs in node.synchronizer.push(frame):
        records = node.tracker.process(fs)
        _infer_and_complete(node, records)


def _infer_and_complete(node: Node, records: list[ItemRecord]) -> None:
    batch = node.cfg.models.max_batch
    for i in range(0, len(records), batch):
        part = records[i : i + batch]
        now = node.clock.now_ms()
        for rec, res in zip(part, node.inspector.infer(part), strict=True):
            node._complete(Decided(rec, node._decide(rec, res, now)))


def _await_together(barrier: Path, count: int, timeout_s: float = 300.0) -> None:
    """Start with `count` processes that share `barrier` (each set up, none timed yet)."""
    barrier.mkdir(parents=True, exist_ok=True)
    (barrier / str(os.getpid())).touch()
    end = time.monotonic() + timeout_s
    while len(list(barrier.iterdir())) < count:
        if time.monotonic() > end:
            raise RuntimeError(f"only {len(list(barrier.iterdir()))} of {count} bench "
                               f"processes reached {barrier}")
        time.sleep(0.002)


def sequential(work: Path, broker: str, together: tuple[Path, int] | None = None
               ) -> dict[str, object]:
    """The plain loop; with `together` (barrier, count), timed from when `count` such
    loops are all ready, so that they run at once."""
    run = Run()
    node = _build(work, broker, run)
    node.publisher.start()
    node.scheduler.start()
    node.publisher.wait_connected(10.0)
    sources = list(node.cameras.sources.values())
    for s in sources:
        s.start()
    if together is not None:
        _await_together(*together)
    cpu0, t0 = time.process_time(), time.time()
    run.gate.set()
    live = list(sources)
    while live:
        for s in list(live):
            try:
                frame = s.read(1.0)
            except EndOfStream:
                live.remove(s)
                continue
            if frame is not None:
                _sequential_step(node, frame)
    _wait_acked(node, run)
    wall = (run.last_ack_ms / 1000.0) - t0
    out = _summary(node, run, wall, time.process_time() - cpu0)
    node.scheduler.stop()
    node.publisher.stop(2.0)
    return out


def stages(work: Path, broker: str, *, reference: bool = True
           ) -> dict[str, dict[str, object]]:
    """Each stage alone on the same data: standalone rate and CPU per camera frame; with
    `reference`, also the item stage in one thread as the sequential loop runs it."""
    run = Run()
    run.gate.set()
    node = _build(work, broker, run)
    lock = threading.Lock()

    def read_all(s: FrameSource, keep: list[Frame] | None, count: list[int]) -> None:
        while True:
            try:
                f = s.read(1.0)
            except EndOfStream:
                return
            if f is not None:
                with lock:
                    count[0] += 1
                    if keep is not None:
                        keep.append(f)

    def read_cameras(sources: list[FrameSource], keep: list[Frame] | None) -> int:
        count = [0]
        for s in sources:
            s.start()
        readers = [threading.Thread(target=read_all, args=(s, keep, count)) for s in sources]
        for r in readers:
            r.start()
        for r in readers:
            r.join()
        for s in sources:
            s.stop()
        return count[0]

    # One reader per camera, as in the node; process CPU, since librealsense's playback
    # threads do part of the work. Timed without keeping the frames (the node lets them go
    # after use; keeping 2.7 GB would time the page faults of a growing heap), then read
    # again, untimed, for the stages below.
    t, c = time.perf_counter(), time.process_time()
    n = read_cameras(list(node.cameras.sources.values()), None)
    out = {"capture": _rate(n, t, c, cpu_now=time.process_time())}
    out["capture"]["note"] = "one reader per camera; process CPU incl. librealsense threads"
    frames: list[Frame] = []
    read_cameras(list(open_cameras(node.cfg, WallClock()).sources.values()), frames)
    frames.sort(key=lambda f: f.timestamp_ms)
    t, c = time.perf_counter(), time.thread_time()
    framesets: list[FrameSet] = []
    for f in frames:
        framesets.extend(node.synchronizer.push(f))
    framesets.extend(node.synchronizer.flush())
    out["sync"] = _rate(n, t, c)
    # The item stage as the node runs it: segmentation in its worker processes (CPU: this
    # thread plus the workers), tracking here; and for reference all of it in one thread.
    workers = SegmentationWorkers(node.tracker.segmenters, node.cfg.items,
                                  node.cfg.items.workers) if node.cfg.items.workers else None
    inbox: BoundedQueue[FrameSet] = BoundedQueue("bench-framesets", len(framesets) + 1)
    outbox: BoundedQueue[ItemRecord] = BoundedQueue("bench-items", 10**6)
    stage = ItemStage(node.tracker, inbox, outbox, threading.Event(), workers=workers)
    pending = list(reversed(framesets))
    placing = 0.0  # CPU spent here putting depth where capture puts it in the node

    def refill() -> None:
        # In the node, capture writes depth straight into the workers' frame slots (and is
        # timed as capture): the framesets get there just before the stage needs them, and
        # that copy is not the item stage's.
        nonlocal placing
        c0 = time.thread_time()
        while pending and inbox.depth() < 8:
            inbox.put_nowait_or_drop(_in_frame_slots(pending.pop(), workers))
        placing += time.thread_time() - c0

    refill()
    t, c = time.perf_counter(), time.thread_time()
    w0 = workers.cpu_s() if workers is not None else 0.0
    while inbox.depth() or stage.in_flight or pending:
        stage.step()
        refill()
    records: list[ItemRecord] = []
    while (rec := outbox.get_nowait()) is not None:
        records.append(rec)
    records += stage.finish()
    w1 = workers.cpu_s() if workers is not None else 0.0
    items = _rate(n, t + placing, c, cpu_now=time.thread_time() - placing + w1 - w0)
    items["note"] = (f"{node.cfg.items.workers} worker processes find items; CPU of this "
                     "thread + the workers; depth already in their frame slots, as capture "
                     "puts it in the node")
    if workers is not None:
        counts = workers.counters()
        items["depth"] = {k: counts[k] for k in ("frames_shared", "frames_copied")}
    stage.close()
    if reference:  # how the sequential loop runs it (for the record, not in the limit)
        node.tracker = ItemTracker(node.tracker.segmenters, node.associator, node.cfg.items)
        t, c = time.perf_counter(), time.thread_time()
        for fs in framesets:
            node.tracker.process(fs)
        node.tracker.flush()
        items["one_thread"] = _rate(n, t, c)
    out["items"] = items
    decided: list[Decided] = []
    batch = node.cfg.models.max_batch
    t, c = time.perf_counter(), time.thread_time()
    for i in range(0, len(records), batch):
        part = records[i : i + batch]
        now = node.clock.now_ms()
        for rec, res in zip(part, node.inspector.infer(part), strict=True):
            decided.append(Decided(rec, node._decide(rec, res, now)))
    out["inference"] = _rate(n, t, c)
    node.publisher.start()
    node.scheduler.start()
    node.publisher.wait_connected(10.0)
    t, c = time.perf_counter(), time.process_time()  # includes the MQTT client's threads
    for d in decided:
        node.scheduler.complete(d.verdict)
    _wait_acked(node, run)
    out["publish"] = _rate(n, t, c, cpu_now=time.process_time())
    out["publish"]["note"] = "process CPU, includes the MQTT network thread"
    node.scheduler.stop()
    node.publisher.stop(2.0)
    return out


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
    wall = time.perf_counter() - t0
    cpu = (cpu_now if cpu_now is not None else time.thread_time()) - c0
    return {"frames_per_s": round(n / max(wall, 1e-9), 1),
            "cpu_ms_per_frame": round(cpu * 1000.0 / max(n, 1), 3), "frames": n}


def realtime(work: Path, broker: str) -> dict[str, object]:
    """The demo path at 2 x 15 fps and 3 items/s, paced in real time."""
    import io

    from edge.demo import DemoOptions, run_demo

    seconds = float(os.environ.get("CV_BENCH_REALTIME_SECONDS", "40"))
    cfg = _base_config()
    summary = run_demo(cfg, DemoOptions(seconds=seconds, items_per_second=ITEMS_PER_SECOND,
                                        seed=3, broker=broker, quiet=True), out=io.StringIO())
    keep = ("items_announced", "items_seen", "verdicts_published", "deadline_misses",
            "latency_ms", "decisions", "camera_frames_dropped", "stage_ms_median", "memory_mb")
    out = {k: summary[k] for k in keep}
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)
    out["seconds"] = seconds
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["stages", "sequential", "pipelined", "realtime"])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--broker", required=True)
    parser.add_argument("--brief", action="store_true",
                        help="stages: leave out the one-thread reference run of the item stage")
    parser.add_argument("--together", type=Path, default=None, metavar="DIR",
                        help="sequential: start the timed loop only when --count processes "
                        "have reached the barrier folder DIR")
    parser.add_argument("--count", type=int, default=2)
    args = parser.parse_args()
    from edge.logs import configure_logging

    configure_logging("warning", "json", stream=sys.stderr)
    result: object
    if args.mode == "stages":
        result = stages(args.workdir, args.broker, reference=not args.brief)
    elif args.mode == "sequential" and args.together is not None:
        result = sequential(args.workdir, args.broker, (args.together, args.count))
    else:
        mode = {"sequential": sequential, "pipelined": pipelined, "realtime": realtime}
        result = mode[args.mode](args.workdir, args.broker)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
