"""Soak test: run the demo for a long time and watch its memory.

    python tools/soak.py [--minutes 10] [--items-per-second 3] [--json PATH]

Samples the RSS of the node and its child processes (item-finding workers, embedded broker)
every 10 s (from /proc) and reports the growth from
the end of the third minute to the end. Warm-up is models and gallery, plus
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


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


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


def tree_rss_mb(pid: int) -> float | None:
    """The node and its children: the device's memory, not one process's."""
    own = rss_mb(pid)
    if own is None:
        return None
    return own + sum(r for c in children(pid) if (r := rss_mb(c)) is not None)


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
            [sys.executable, "-m", "edge.cli", "demo", "--seconds", str(seconds), "--quiet",
             "--items-per-second", str(args.items_per_second), "--damage-rate", "0.01",
             "--summary-json", str(summary_path)],
            stdout=subprocess.DEVNULL)
        samples: list[tuple[float, float]] = []
        t0 = time.monotonic()
        while proc.poll() is None:
            rss = tree_rss_mb(proc.pid)
            if rss is not None:
                samples.append((time.monotonic() - t0, rss))
            time.sleep(10.0)
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    warm = [r for t, r in samples if t >= WARMUP_S]
    result = {
        "minutes": args.minutes,
        "samples": len(samples),
        "rss_mb_after_warmup": round(warm[0], 1) if warm else None,
        "rss_mb_end": round(warm[-1], 1) if warm else None,
        "rss_mb_peak": round(max(r for _, r in samples), 1) if samples else None,
        "growth_pct": round(100.0 * (warm[-1] - warm[0]) / warm[0], 2) if len(warm) > 1 else None,
        "items_announced": summary.get("items_announced"),
        "deadline_misses": summary.get("deadline_misses"),
        "latency_ms": summary.get("latency_ms"),
        "exit_code": proc.returncode,
        "rss_mb_per_minute": [round(r, 1) for t, r in samples if int(t) % 60 < 10],
    }
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
