"""The periodic heap trim: memory a fragmented heap holds goes back to the OS."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from edge.config import config_from_mapping
from edge.heap import HeapTrimmer, glibc_malloc_trim

pytestmark = pytest.mark.skipif(glibc_malloc_trim() is None, reason="not glibc: no malloc_trim")

_FRAGMENT = textwrap.dedent("""
    import json, numpy as np
    from edge.heap import HeapTrimmer

    def rss_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0

    # 64 KB blocks come from the heap (below the mmap threshold); keeping every 16th leaves
    # 960 KB holes between live blocks, which free() cannot give back by itself.
    blocks = [np.ones(8192) for _ in range(1600)]
    kept = blocks[::16]
    del blocks
    before = rss_mb()
    trimmer = HeapTrimmer(60.0)
    released = trimmer.trim_now()
    print(json.dumps({"before": before, "after": rss_mb(), "released": released,
                      "kept": len(kept)}))
""")


def test_a_trim_hands_the_holes_of_a_fragmented_heap_back() -> None:
    out = subprocess.run([sys.executable, "-c", _FRAGMENT], capture_output=True, text=True,
                         check=True, timeout=60)
    result = json.loads(out.stdout)
    assert result["released"] is True
    # ~94 MB of holes; the 6 MB still in use stay.
    assert result["before"] - result["after"] > 60.0, result


def test_the_trimmer_runs_every_interval_counts_in_metrics_and_stops_promptly() -> None:
    calls: list[float] = []
    trimmer = HeapTrimmer(0.05, trim=lambda: calls.append(time.monotonic()) or 1)
    registry = CollectorRegistry()
    trimmer.register_metrics(registry)
    trimmer.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    trimmer.stop()
    assert time.monotonic() - t0 < 0.5
    assert 4 <= len(calls) <= 12
    assert trimmer.released == trimmer.trims == len(calls)
    text = generate_latest(registry).decode()
    assert f"cv_heap_trims_total {float(len(calls))}" in text


def test_the_trim_interval_is_configurable_and_can_be_switched_off() -> None:
    assert config_from_mapping({}).node.heap_trim_interval_s == 10.0
    assert config_from_mapping({"node": {"heap_trim_interval_s": None}}).node \
        .heap_trim_interval_s is None
    with pytest.raises(ValueError, match="heap_trim_interval_s"):
        config_from_mapping({"node": {"heap_trim_interval_s": 0.0}})
