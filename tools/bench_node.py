"""One measured run of the node for `tools/bench.py` (a child process per mode).

    python tools/bench_node.py MODE --workdir DIR --broker URL
    MODE: stages | sequential | pipelined | realtime

Prints one JSON line with the run's numbers. The shared set-up is in `bench_harness.py`, the
`stages` run in `bench_stages.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench_harness import (
    ITEMS_PER_SECOND,
    Run,
    base_config,
    build_timed,
    peak_rss_mb,
    summary,
    wait_acked,
)
from bench_stages import stages

from edge.capture.source import EndOfStream
from edge.perception.segmentation_workers import SegmentationWorkers
from edge.pipeline.node import Node, stage_timings
from edge.types import Frame, ItemRecord


def pipelined(work: Path, broker: str) -> dict[str, object]:
    """The node's threads and bounded queues, timed from the first read to the last PUBACK."""
    run = Run()
    node = build_timed(work, broker, run)
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
    wait_acked(node, run)
    wall = (run.last_ack_ms / 1000.0) - t0
    # The item-finding worker processes' CPU counts too.
    cpu = time.process_time() - cpu0 + (workers.cpu_s() - w0 if workers is not None else 0.0)
    out = summary(node, run, wall, cpu)
    out["stage_ms_median"] = {k: round(v, 2) for k, v in stage_timings(node).items()}
    out["queue_drops"] = {q.name: q.dropped for q in node._queues()}
    if workers is not None:
        out["item_workers"] = {**workers.counters(), "cpu_s": round(workers.cpu_s(), 3),
                               "peak_rss_mb": round(workers.peak_rss_mb(), 1)}
        out["peak_rss_mb_with_workers"] = round(
            peak_rss_mb() + workers.peak_rss_mb(), 1)
    node.stop()
    return out


def _sequential_step(node: Node, frame: Frame) -> None:
    """One camera frame through every stage of the plain loop."""
    for fs in node.synchronizer.push(frame):
        records = node.tracker.process(fs)
        _infer_and_complete(node, records)


def _infer_and_complete(node: Node, records: list[ItemRecord]) -> None:
    """Inference on the finished items in batches (the verdicts go to the scheduler)."""
    batch = node.cfg.models.max_batch
    for i in range(0, len(records), batch):
        node.inference.run_batch(records[i : i + batch])


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
    node = build_timed(work, broker, run)
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
    wait_acked(node, run)
    wall = (run.last_ack_ms / 1000.0) - t0
    out = summary(node, run, wall, time.process_time() - cpu0)
    node.scheduler.stop()
    node.publisher.stop(2.0)
    return out

def realtime(work: Path, broker: str) -> dict[str, object]:
    """The demo path at 2 x 15 fps and 3 items/s, paced in real time."""
    import io

    from edge.app.demo import DemoOptions, run_demo

    seconds = float(os.environ.get("CV_BENCH_REALTIME_SECONDS", "40"))
    cfg = base_config()
    demo = run_demo(cfg, DemoOptions(seconds=seconds, items_per_second=ITEMS_PER_SECOND,
                                     seed=3, broker=broker, quiet=True), out=io.StringIO())
    keep = ("items_announced", "items_seen", "verdicts_published", "deadline_misses",
            "latency_ms", "decisions", "camera_frames_dropped", "stage_ms_median", "memory_mb")
    out = {k: demo[k] for k in keep}
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    out["seconds"] = seconds
    return out


def main() -> int:
    """Runs the mode the command line names and prints its JSON line."""
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
