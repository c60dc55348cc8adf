"""Soak test: run the demo for a long time and watch its memory.

    python tools/soak.py [--minutes 10] [--items-per-second 3] [--json PATH]

Samples the memory of the node and its child processes (item-finding workers, embedded
broker) every 10 s from /proc: PSS summed over them (every page once), the node's own RSS and
the plain sum of RSS; reports the growth of the PSS from the end of the third minute to the
end. Warm-up is models and gallery, plus
the bounded in-memory caches filling: the last 256 decided items kept for
feedback (1.5 min at 3 items/s) and the synthetic cameras' texture cache.
Target (issue: the pipelined node): no growth beyond 5 % over 10 minutes.
Not part of CI: it takes as long as it says.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WARMUP_S = 180.0


def proc_mb(pid: int, table: str, key: str) -> float | None:
    """One kB line of /proc/PID/TABLE in MB; None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/{table}").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def rss_mb(pid: int) -> float | None:
    return proc_mb(pid, "status", "VmRSS")


def pss_mb(pid: int) -> float | None:
    """Proportional set size: shared pages divided among the processes that map them."""
    return proc_mb(pid, "smaps_rollup", "Pss")


def children(pid: int) -> list[int]:
    """Direct children (the item-finding worker processes, the embedded broker)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2:].split()[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def role(pid: int) -> str:
    """What a child of the node is, from its command line."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return f"child {pid}"
    if "edge.perception.segmentation_child" in cmd:
        return f"item worker {pid}"
    return f"broker {pid}" if "mosquitto" in cmd else f"child {pid}"


def tree_mb(pid: int) -> tuple[float, float, float, dict[str, float]] | None:
    """The node process's RSS; the RSS summed over it and its children (counts the library
    pages they share once per process); their PSS summed (each page once: what the device
    spends); and the PSS of each process, so that growth can be traced to one of them."""
    own = rss_mb(pid)
    own_pss = pss_mb(pid)
    if own is None or own_pss is None:
        return None
    kids = children(pid)
    rss = own + sum(r for c in kids if (r := rss_mb(c)) is not None)
    each = {"node": own_pss} | {role(c): p for c in kids if (p := pss_mb(c)) is not None}
    return own, rss, sum(each.values()), each


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--items-per-second", type=float, default=3.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    seconds = args.minutes * 60.0
    with tempfile.TemporaryDirectory() as tmp:
        summary_path = Path(tmp) / "summary.json"
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge", "demo", "--seconds", str(seconds), "--quiet",
             "--items-per-second", str(args.items_per_second), "--damage-rate", "0.01",
             "--summary-json", str(summary_path)],
            stdout=subprocess.DEVNULL)
        samples: list[tuple[float, float]] = []  # (t, PSS of the node and its children)
        per_process: list[tuple[float, dict[str, float]]] = []
        node_rss: list[float] = []
        tree_rss: list[float] = []
        t0 = time.monotonic()
        while proc.poll() is None:
            mb = tree_mb(proc.pid)
            if mb is not None:
                node_rss.append(mb[0])
                tree_rss.append(mb[1])
                samples.append((time.monotonic() - t0, mb[2]))
                per_process.append((samples[-1][0], mb[3]))
            time.sleep(10.0)
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    warm = [r for t, r in samples if t >= WARMUP_S]
    warm_each = [each for t, each in per_process if t >= WARMUP_S]
    result = {
        "minutes": args.minutes,
        "samples": len(samples),
        "what": "PSS of the node and its children (item workers, broker), from /proc",
        "pss_mb_after_warmup": round(warm[0], 1) if warm else None,
        "pss_mb_end": round(warm[-1], 1) if warm else None,
        "pss_mb_peak": round(max(r for _, r in samples), 1) if samples else None,
        "node_rss_mb_peak": round(max(node_rss), 1) if node_rss else None,
        "sum_of_rss_mb_peak": round(max(tree_rss), 1) if tree_rss else None,
        "growth_pct": round(100.0 * (warm[-1] - warm[0]) / warm[0], 2) if len(warm) > 1 else None,
        "items_announced": summary.get("items_announced"),
        "deadline_misses": summary.get("deadline_misses"),
        "latency_ms": summary.get("latency_ms"),
        "exit_code": proc.returncode,
        "pss_mb_per_minute": [round(r, 1) for t, r in samples if int(t) % 60 < 10],
        # A worker respawned mid-run shows with one number only.
        "pss_mb_by_process_after_warmup_and_end": {
            name: [round(warm_each[0][name], 1) if name in warm_each[0] else None,
                   round(warm_each[-1][name], 1) if name in warm_each[-1] else None]
            for name in {**warm_each[0], **warm_each[-1]}} if warm_each else None,
    }
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
