"""Benchmark of the whole node: pipelined against a sequential loop, on the same recorded frames.

    python tools/bench.py [--seconds N] [--json PATH] [--realtime-seconds M]

1. Renders N seconds of the synthetic belt (2 cameras x 15 fps, 640x480, 3 items/s) into
   RealSense `.db3` recordings plus calibration files, and starts a private mosquitto.
2. In separate child processes (so that peak RSS and CPU are each run's own), plays the
   recordings through the real `RealSenseSource` (offline: as fast as the node takes them;
   written uncompressed, as a live camera hands over raw frames):
   - `pipelined`: the node's threads and bounded queues (`edge.node.Node`);
   - `sequential`: the same components called one after another in one thread;
   - `stages`: each stage alone on the same data (per-frame CPU time and standalone rate).
   Stages, sequential and pipelined run as `--repeat` rounds, one after another; the round
   with the median speedup is reported (its efficiency against its own stages), every round
   is listed.
3. A real-time run of the demo path (synthetic cameras paced at 15 fps, 3 items/s, announced
   over MQTT): capture-to-PUBACK latency and deadline misses.

Writes the JSON the issue defines (`pipelined`, `sequential`, `stages`,
`limit_frames_per_s`, `speedup`, `efficiency`, `realtime`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_node  # noqa: E402  (tools/ is not a package)


def _child(mode: str, workdir: Path, broker: str) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE / "bench_node.py"), mode, "--workdir", str(workdir),
           "--broker", broker]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"bench child {mode} failed:\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _limit(stages: dict[str, Any]) -> float:
    """The pipeline's physical limit: the slowest stage alone, or all cores busy."""
    per_frame_cpu_s = sum(float(s["cpu_ms_per_frame"]) for s in stages.values()) / 1000.0
    slowest = min(float(s["frames_per_s"]) for s in stages.values())
    return min(slowest, (os.cpu_count() or 1) / per_frame_cpu_s)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="recorded belt time")
    parser.add_argument("--realtime-seconds", type=float, default=40.0,
                        help="length of the real-time latency run (0: skip)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds of stages, sequential and pipelined; the round with the "
                        "median speedup is reported")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--replay", choices=["recording", "memory"], default="recording",
                        help="play the .db3 files through librealsense for every run, or read "
                        "them once and replay the frames from memory")
    args = parser.parse_args()
    os.environ["CV_BENCH_REPLAY"] = args.replay
    from edge.publish.broker import MosquittoBroker

    with tempfile.TemporaryDirectory(prefix="cv-bench-") as tmp:
        work = Path(tmp)
        frames = bench_node.prepare(work, args.seconds, args.seed)
        print(f"bench: recorded {frames} frames per camera", file=sys.stderr)
        with MosquittoBroker(work / "broker") as broker:
            results: dict[str, object] = {}
            # Alternating runs: a noisy machine slows both sides of a pair alike, and the
            # median pair tells more than one run. The stages run alone again in every round,
            # so that each round's efficiency compares runs made minutes apart, not a quarter
            # of an hour (this machine's speed drifts by 20 % over that).
            pairs: list[dict[str, Any]] = []
            for k in range(args.repeat):
                print(f"bench: round {k + 1}/{args.repeat}: stages, sequential, pipelined ...",
                      file=sys.stderr)
                stages_k = _child("stages", work, broker.url)
                seq_k = _child("sequential", work, broker.url)
                pipe_k = _child("pipelined", work, broker.url)
                limit_k = _limit(stages_k)
                pairs.append({"stages": stages_k, "sequential": seq_k, "pipelined": pipe_k,
                              "limit_frames_per_s": round(limit_k, 2),
                              "efficiency": round(float(pipe_k["frames_per_s"]) / limit_k, 3),
                              "speedup": round(float(pipe_k["items_per_s"])
                                               / max(1e-9, float(seq_k["items_per_s"])), 3)})
            by_speedup = sorted(pairs, key=lambda p: float(p["speedup"]))
            median_pair = by_speedup[len(by_speedup) // 2]
            for key in ("stages", "sequential", "pipelined"):
                results[key] = median_pair[key]
            results["pairs"] = [{"speedup": p["speedup"], "efficiency": p["efficiency"],
                                 "limit_frames_per_s": p["limit_frames_per_s"],
                                 "sequential_items_per_s": p["sequential"]["items_per_s"],
                                 "pipelined_items_per_s": p["pipelined"]["items_per_s"],
                                 "pipelined_frames_per_s": p["pipelined"]["frames_per_s"]}
                                for p in pairs]
            if args.realtime_seconds > 0:
                print("bench: realtime ...", file=sys.stderr)
                os.environ["CV_BENCH_REALTIME_SECONDS"] = str(args.realtime_seconds)
                results["realtime"] = _child("realtime", work, broker.url)
    stages = results.pop("stages")
    assert isinstance(stages, dict)
    limit = _limit(stages)
    efficiencies = sorted(float(p["efficiency"]) for p in pairs)
    pipe, seq = results["pipelined"], results["sequential"]
    assert isinstance(pipe, dict)
    assert isinstance(seq, dict)
    out = {
        **results,
        "stages": stages,
        "cores": os.cpu_count() or 1,
        "limit_frames_per_s": round(limit, 2),
        "speedup": round(float(pipe["items_per_s"]) / max(1e-9, float(seq["items_per_s"])), 3),
        "speedup_note": f"median of {args.repeat} rounds by speedup (see pairs)",
        "efficiency": round(float(pipe["frames_per_s"]) / limit, 3),
        "efficiency_median": efficiencies[len(efficiencies) // 2],
        "efficiency_note": "pipelined frames/s over the limit from the stages run alone in the "
                           "same round; `efficiency` is the median-speedup round's",
        "replay": args.replay,
        "numpy": np.__version__,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
