"""Clocks: the node's notion of 'now', injectable so tests and replays control time."""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> float:
        """Milliseconds since the Unix epoch on this clock."""
        ...

    def sleep_until(self, t_ms: float, stop: threading.Event) -> bool:
        """Wait until `t_ms`; False if `stop` was set first."""
        ...


class WallClock:
    """The host's real-time clock (what RealSense's global time domain maps to)."""

    def now_ms(self) -> float:
        return time.time() * 1000.0

    def sleep_until(self, t_ms: float, stop: threading.Event) -> bool:
        delay = (t_ms - self.now_ms()) / 1000.0
        if delay > 0:
            return not stop.wait(delay)
        return not stop.is_set()


class ManualClock:
    """A clock that only moves when told to (tests, offline replay)."""

    def __init__(self, start_ms: float = 1_700_000_000_000.0) -> None:
        self._now = start_ms
        self._cond = threading.Condition()

    def now_ms(self) -> float:
        with self._cond:
            return self._now

    def advance(self, ms: float) -> None:
        with self._cond:
            self._now += ms
            self._cond.notify_all()

    def set(self, t_ms: float) -> None:
        with self._cond:
            self._now = max(self._now, t_ms)
            self._cond.notify_all()

    def sleep_until(self, t_ms: float, stop: threading.Event) -> bool:
        with self._cond:
            while self._now < t_ms:
                if stop.is_set():
                    return False
                self._cond.wait(0.05)
        return not stop.is_set()
