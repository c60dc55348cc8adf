"""Benchmark of the whole node: pipelined against a sequential loop, on the same recorded frames.

    python tools/bench.py [--seconds N] [--json PATH] [--realtime-seconds M]

1. Renders N seconds of the synthetic belt (2 cameras x 15 fps, 640x480, 3 items/s) into
   RealSense `.db3` recordings plus calibration files, and starts a private mosquitto.
2. In separate child processes (so that peak RSS and CPU are each run's own), plays the
   recordings through the real `RealSenseSource` (offline: as fast as the node takes them;
   written uncompressed, as a live camera hands over raw frames):
   - `pipelined`: the node's threads and bounded queues (`edge.pipeline.node.Node`);
   - `sequential`: the same components called one after another in one thread;
   - `stages`: each stage alone on the same data (per-frame CPU time and standalone rate);
   - one sequential loop per core, all at once (each its own process and state, the same
     recordings): the speedup any split of the loop over the cores could reach here.
   They run as `--repeat` rounds: stages, pipelined, stages again, sequential, loops at
   once. A round's efficiency compares its pipelined run with the stages run right before
   and right after it; speedup, efficiency, limit and parallel ceiling are reported as
   medians over the rounds, and every round is listed.
3. A real-time run of the demo path (synthetic cameras paced at 15 fps, 3 items/s, announced
   over MQTT): capture-to-PUBACK latency and deadline misses.

Writes the JSON the issue defines (`pipelined`, `sequential`, `stages`,
`limit_frames_per_s`, `speedup`, `efficiency`, `realtime`), plus `parallel_ceiling` and
`of_ceiling` (speedup over ceiling).
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

import bench_harness  # noqa: E402  (tools/ is not a package)


def _command(mode: str, workdir: Path, broker: str, *extra: str) -> list[str]:
    """The command line of a `bench_node.py` child."""
    return [sys.executable, str(HERE / "bench_node.py"), mode, "--workdir", str(workdir),
            "--broker", broker, *extra]


def _result(mode: str, returncode: int, stdout: str, stderr: str) -> dict[str, Any]:
    """A finished child's JSON line (RuntimeError with its stderr if it failed)."""
    if returncode != 0:
        raise RuntimeError(f"bench child {mode} failed:\n{stderr[-4000:]}")
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return result


def _child(mode: str, workdir: Path, broker: str, *extra: str) -> dict[str, Any]:
    """Runs one child to its end: its JSON line."""
    proc = subprocess.run(_command(mode, workdir, broker, *extra), capture_output=True,
                          text=True, check=False, timeout=1800)
    return _result(mode, proc.returncode, proc.stdout, proc.stderr)


def _loops_at_once(workdirs: list[Path], broker: str, barrier: Path) -> dict[str, Any]:
    """One sequential loop per workdir, all in their own processes at once on the same
    recordings, started together: a split of the loop's work over the cores with no
    hand-over at all, which no pipeline of the same work can beat."""
    procs = [subprocess.Popen(_command("sequential", w, broker, "--together", str(barrier),
                                       "--count", str(len(workdirs))),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w in workdirs]
    outputs = [p.communicate(timeout=1800) for p in procs]
    runs = [_result("sequential", p.returncode, *out) for p, out in zip(procs, outputs,
                                                                        strict=True)]
    wall = max(float(r["wall_s"]) for r in runs)  # until the last loop's last PUBACK
    return {"loops": len(runs),
            "items_per_s": round(sum(int(r["items"]) for r in runs) / wall, 3),
            "frames_per_s": round(sum(int(r["frames"]) for r in runs) / wall, 2),
            "each_frames_per_s": [r["frames_per_s"] for r in runs]}


def _limit(stages: dict[str, Any]) -> float:
    """The pipeline's physical limit: the slowest stage alone, or all cores busy."""
    per_frame_cpu_s = sum(float(s["cpu_ms_per_frame"]) for s in stages.values()) / 1000.0
    slowest = min(float(s["frames_per_s"]) for s in stages.values())
    return min(slowest, (os.cpu_count() or 1) / per_frame_cpu_s)


def _mean_stages(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Each stage's numbers from the two standalone runs that bracket a pipelined run."""
    out: dict[str, Any] = {}
    for name, first in before.items():
        second = after[name]
        # Mean time per frame, so the rate is the harmonic mean of the two rates.
        per_frame_s = (1.0 / float(first["frames_per_s"]) + 1.0 / float(second["frames_per_s"]))
        out[name] = {**first,
                     "frames_per_s": round(2.0 / per_frame_s, 1),
                     "cpu_ms_per_frame": round((float(first["cpu_ms_per_frame"])
                                                + float(second["cpu_ms_per_frame"])) / 2.0, 3),
                     "before_after_frames_per_s": [first["frames_per_s"],
                                                   second["frames_per_s"]]}
    return out


def _median(values: list[float]) -> float:
    """The median, rounded as the report gives it."""
    return round(float(np.median(values)), 3)


def _arguments() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="recorded belt time")
    parser.add_argument("--realtime-seconds", type=float, default=40.0,
                        help="length of the real-time latency run (0: skip)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5,
                        help="rounds of stages, pipelined, stages again and sequential; "
                        "medians over the rounds are reported")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--replay", choices=["recording", "memory"], default="recording",
                        help="play the .db3 files through librealsense for every run, or read "
                        "them once and replay the frames from memory")
    return parser.parse_args()


def _round(work: Path, broker: str, loop_dirs: list[Path], k: int, repeat: int
           ) -> dict[str, Any]:
    """Round `k`: stages, pipelined, stages again, sequential, then one sequential loop per
    workdir at once; the round's runs and the ratios between them."""
    print(f"bench: round {k + 1}/{repeat}: stages, pipelined, stages, "
          f"sequential, {len(loop_dirs)} sequential at once ...", file=sys.stderr)
    before = _child("stages", work, broker)
    pipe_k = _child("pipelined", work, broker)
    after = _child("stages", work, broker, "--brief")
    seq_k = _child("sequential", work, broker)
    at_once = _loops_at_once(loop_dirs, broker, work / f"barrier-{k}")
    limit_k = (_limit(before) + _limit(after)) / 2.0
    return {
        "stages": _mean_stages(before, after), "sequential": seq_k,
        "pipelined": pipe_k, "limit_frames_per_s": round(limit_k, 2),
        "limit_before_after": [round(_limit(before), 2), round(_limit(after), 2)],
        "efficiency": round(float(pipe_k["frames_per_s"]) / limit_k, 3),
        "speedup": round(float(pipe_k["items_per_s"])
                         / max(1e-9, float(seq_k["items_per_s"])), 3),
        "sequential_at_once": at_once,
        "parallel_ceiling": round(float(at_once["items_per_s"])
                                  / max(1e-9, float(seq_k["items_per_s"])), 3),
        "of_ceiling": round(float(pipe_k["items_per_s"])
                            / max(1e-9, float(at_once["items_per_s"])), 3)}


def _median_round(rounds: list[dict[str, Any]]) -> dict[str, object]:
    """The runs of the round with the median speedup, and every round's ratios."""
    results: dict[str, object] = {}
    by_speedup = sorted(rounds, key=lambda r: float(r["speedup"]))
    median_round = by_speedup[len(by_speedup) // 2]
    for key in ("stages", "sequential", "pipelined"):
        results[key] = median_round[key]
    results["rounds"] = [{key: r[key] for key in (
        "speedup", "efficiency", "limit_frames_per_s", "limit_before_after",
        "parallel_ceiling", "of_ceiling", "sequential_at_once")}
        | {"sequential_items_per_s": r["sequential"]["items_per_s"],
           "pipelined_items_per_s": r["pipelined"]["items_per_s"],
           "pipelined_frames_per_s": r["pipelined"]["frames_per_s"]}
        for r in rounds]
    return results


def _measure(args: argparse.Namespace) -> tuple[dict[str, object], list[dict[str, Any]], int]:
    """Records the belt, then runs the rounds and the real-time run against a private broker:
    the results, the rounds and the core count."""
    from edge.publish.broker import MosquittoBroker

    with tempfile.TemporaryDirectory(prefix="cv-bench-") as tmp:
        work = Path(tmp)
        frames = bench_harness.prepare(work, args.seconds, args.seed)
        print(f"bench: recorded {frames} frames per camera", file=sys.stderr)
        cores = os.cpu_count() or 1
        loop_dirs = [work] + [bench_harness.with_own_state(work, f"loop-{i + 1}")
                              for i in range(1, cores)]
        with MosquittoBroker(work / "broker") as broker:
            # Alternating runs: a noisy machine slows both sides of a pair alike, and the
            # median of several rounds tells more than one run. In every round the stages run
            # alone right before and right after the pipelined node, and the round's limit is
            # the mean of the two: this machine's speed drifts within minutes, and a bracket
            # cancels the drift that a single measurement would carry into the ratio.
            rounds = [_round(work, broker.url, loop_dirs, k, args.repeat)
                      for k in range(args.repeat)]
            results = _median_round(rounds)
            if args.realtime_seconds > 0:
                print("bench: realtime ...", file=sys.stderr)
                os.environ["CV_BENCH_REALTIME_SECONDS"] = str(args.realtime_seconds)
                results["realtime"] = _child("realtime", work, broker.url)
    return results, rounds, cores


def _report(results: dict[str, object], rounds: list[dict[str, Any]], cores: int,
            args: argparse.Namespace) -> dict[str, object]:
    """The JSON report: the median round's runs, the medians over the rounds, and a note."""
    stages = results.pop("stages")
    assert isinstance(stages, dict)
    return {
        **results,
        "stages": stages,
        "cores": cores,
        "limit_frames_per_s": _median([float(r["limit_frames_per_s"]) for r in rounds]),
        "speedup": _median([float(r["speedup"]) for r in rounds]),
        "efficiency": _median([float(r["efficiency"]) for r in rounds]),
        "parallel_ceiling": _median([float(r["parallel_ceiling"]) for r in rounds]),
        "of_ceiling": _median([float(r["of_ceiling"]) for r in rounds]),
        "note": f"speedup, efficiency, limit and parallel_ceiling are medians over "
                f"{args.repeat} rounds (each round's in `rounds`; efficiency: the round's "
                "pipelined frames/s over the mean of the limits from the stages run alone right "
                "before and right after it; parallel_ceiling: one sequential loop per core, all "
                "at once on the same recordings, items/s over the round's single loop; of_ceiling: "
                "the pipelined items/s over those loops' together, i.e. speedup / ceiling); "
                "`pipelined`, `sequential` and `stages` are the round with the median speedup",
        "replay": args.replay,
        "numpy": np.__version__,
    }


def main() -> int:
    """Runs the whole benchmark and prints (and optionally writes) its JSON report."""
    args = _arguments()
    os.environ["CV_BENCH_REPLAY"] = args.replay
    results, rounds, cores = _measure(args)
    text = json.dumps(_report(results, rounds, cores, args), indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
