"""The plumbing every pipeline stage shares: bounded queues, a named thread, its own metrics.

A stage is a small object with one `step` method; `StageThread` runs it in
a named thread until the node's stop event is set, and records how long each
step took and when the stage last made progress (the systemd watchdog and
the health summary read that).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import structlog

from edge.workers import WorkerThread

log = structlog.get_logger(__name__)

T = TypeVar("T")


class BoundedQueue(Generic[T]):
    """A queue with a fixed capacity that counts what it had to refuse or shed."""

    def __init__(self, name: str, maxsize: int) -> None:
        self.name = name
        self.maxsize = maxsize
        self._q: queue.Queue[T] = queue.Queue(maxsize)
        self.dropped = 0
        self.peak = 0

    def put_nowait_or_drop(self, value: T) -> bool:
        """Never blocks: a full queue refuses the value and counts it (capture's policy)."""
        try:
            self._q.put_nowait(value)
        except queue.Full:
            self.dropped += 1
            return False
        self.peak = max(self.peak, self._q.qsize())
        return True

    def put(self, value: T, stop: threading.Event, poll_s: float = 0.05) -> bool:
        """Blocks while full (backpressure), giving up only when the node stops; then a value
        that still fits goes in (the shutdown empties the queues), and False means full."""
        while not stop.is_set():
            try:
                self._q.put(value, timeout=poll_s)
            except queue.Full:
                continue
            self.peak = max(self.peak, self._q.qsize())
            return True
        try:
            self._q.put_nowait(value)
        except queue.Full:
            return False
        return True

    def hand_on(self, value: T, stop: threading.Event, *, lossless: bool) -> bool:
        """The pipeline's policy in one place: wait for room when nothing may be lost
        (recordings played offline), else never block and count the drop (live cameras)."""
        return self.put(value, stop) if lossless else self.put_nowait_or_drop(value)

    def get(self, timeout_s: float) -> T | None:
        try:
            return self._q.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def get_nowait(self) -> T | None:
        try:
            return self._q.get_nowait()
        except queue.Empty:
            return None

    def depth(self) -> int:
        return self._q.qsize()


@dataclass(slots=True)
class StageStats:
    """What a stage reports about itself."""

    name: str
    steps: int = 0
    busy_s: float = 0.0
    errors: int = 0
    last_progress_mono: float = field(default_factory=time.monotonic)
    recent_ms: deque[float] = field(default_factory=lambda: deque(maxlen=2048))
    thread_cpu_s: float = 0.0
    #: the first and the latest error of the current run of failed steps (None: none since
    #: the last step that worked)
    failing_since_mono: float | None = None
    last_error_mono: float | None = None
    #: errors further apart than this are separate incidents, not one failing run
    failing_window_s: float = 10.0

    def observe(self, seconds: float) -> None:
        self.steps += 1
        self.busy_s += seconds
        self.recent_ms.append(seconds * 1000.0)
        self.last_progress_mono = time.monotonic()
        self.failing_since_mono = self.last_error_mono = None

    def idle(self) -> None:
        """The stage is alive but had nothing to do: that is progress too."""
        self.last_progress_mono = time.monotonic()

    def error(self) -> None:
        """A step raised: not progress, and the start (or continuation) of a failing run."""
        self.errors += 1
        now = time.monotonic()
        if self.failing_since_mono is None or (
                self.last_error_mono is not None
                and now - self.last_error_mono > self.failing_window_s):
            self.failing_since_mono = now  # (two bad items minutes apart are no failing run)
        self.last_error_mono = now

    def failing_for_s(self, recent_s: float) -> float:
        """How long every step that had work has raised, if the latest error is less than
        `recent_s` old (0: not failing). One bad item on a quiet belt is not a failing
        stage; steps that raise on every batch for longer than the stall time are."""
        if self.failing_since_mono is None or self.last_error_mono is None:
            return 0.0
        now = time.monotonic()
        if now - self.last_error_mono > recent_s:
            return 0.0
        return now - self.failing_since_mono


class StageThread:
    """Runs `step()` repeatedly in a named thread.

    `step` returns False when it had nothing to do, True when it did work (the whole step
    is timed), or the seconds it worked (stages that wait on a queue inside `step` time only
    the work). `observe` receives each working step's duration (the node's histograms).
    """

    def __init__(self, name: str, step: Callable[[], float | bool], stop: threading.Event,
                 observe: Callable[[str, float], None] | None = None,
                 on_exit: Callable[[], None] | None = None,
                 failing_window_s: float = 10.0) -> None:
        self.name = name
        self.stats = StageStats(name, failing_window_s=failing_window_s)
        self._step = step
        self._observe = observe
        self._on_exit = on_exit
        # The node's stages share one stop event: they stop together.
        self._worker = WorkerThread(f"cv-{name}", self._run, stop_event=stop)
        self.failed: BaseException | None = None

    def start(self) -> None:
        self._worker.start()

    def _run(self, stop: threading.Event) -> None:
        log.debug("stage_started", stage=self.name)
        try:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    worked = self._step()
                except Exception as exc:  # a bad item must not kill the stage
                    self.stats.error()
                    log.exception("stage_step_failed", stage=self.name, error=str(exc))
                    time.sleep(0.05)
                    continue
                if worked is not False:
                    dt = time.perf_counter() - t0 if worked is True else float(worked)
                    self.stats.observe(dt)
                    if self._observe is not None:
                        self._observe(self.name, dt)
                else:
                    self.stats.idle()
                self.stats.thread_cpu_s = time.thread_time()
        except BaseException as exc:  # pragma: no cover - reported, then the node stops
            self.failed = exc
            raise
        finally:
            if self._on_exit is not None:
                self._on_exit()
            log.debug("stage_stopped", stage=self.name, steps=self.stats.steps)

    def join(self, timeout_s: float) -> bool:
        """Wait for the stage to end (its stop event is set); False when it is stuck."""
        return self._worker.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._worker.alive

    def stalled_for_s(self) -> float:
        return time.monotonic() - self.stats.last_progress_mono
