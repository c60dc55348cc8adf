"""Handing freed heap memory back to the operating system, periodically.

The node allocates and frees two large images per camera frame in a dozen threads. glibc
serves them from its heap arenas and keeps what is freed between live blocks for the life of
the process. `malloc_trim(0)` returns the free pages of every arena (since glibc 2.8, not
only the top of the heap). In soaks the node process grew without it while the memory Python
tracks stayed flat; with it, what glibc holds is bounded, though not every kind of growth
(BENCHMARKS.md, soak). A trim takes a few milliseconds, holding each arena's lock in turn.
Elsewhere than glibc there is nothing to trim and this does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time
from collections.abc import Callable, Iterator

import structlog
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from edge.workers import WorkerThread

log = structlog.get_logger(__name__)


def glibc_malloc_trim() -> Callable[[], int] | None:
    """`malloc_trim(0)` of this process's C library, or None when it has none (not glibc)."""
    with contextlib.suppress(OSError, AttributeError):
        trim = ctypes.CDLL("libc.so.6").malloc_trim
        trim.argtypes = [ctypes.c_size_t]
        trim.restype = ctypes.c_int
        return lambda: int(trim(0))
    return None


class HeapTrimmer:
    """A thread that calls `malloc_trim` every `interval_s` until stopped."""

    def __init__(self, interval_s: float,
                 trim: Callable[[], int] | None = None) -> None:
        self.interval_s = interval_s
        self._trim = trim if trim is not None else glibc_malloc_trim()
        self._worker = WorkerThread("cv-heap-trim", self._run)
        self.trims = 0
        self.released = 0  # trims after which the C library reported memory handed back
        self.trim_seconds = 0.0

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Add the trimmer's counters to a node's Prometheus registry (read at scrape time,
        as every component's are)."""
        registry.register(_TrimCollector(self))

    def start(self) -> None:
        if self._trim is None:
            log.info("heap_trim_unavailable", why="not glibc")
            return
        self._worker.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._worker.stop(timeout_s)

    def trim_now(self) -> bool:
        """One trim; True when memory was handed back."""
        if self._trim is None:
            return False
        t0 = time.perf_counter()
        released = self._trim() == 1
        spent = time.perf_counter() - t0
        self.trims += 1
        self.released += released
        self.trim_seconds += spent
        return released

    def _run(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval_s):
            self.trim_now()


class _TrimCollector(Collector):
    def __init__(self, trimmer: HeapTrimmer) -> None:
        self._trimmer = trimmer

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily("cv_heap_trims", "Periodic malloc_trim calls",
                                  value=self._trimmer.trims)
        yield CounterMetricFamily("cv_heap_trim_seconds", "Time spent in malloc_trim",
                                  value=self._trimmer.trim_seconds)
