"""What waits for the shared gallery's worker: this node's learned views (first, bounded in
number) and messages from the broker, one per topic (a newer one replaces one still waiting:
the broker keeps only the latest too), bounded in bytes."""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass

from edge.types import U8Array


@dataclass(frozen=True, slots=True)
class Learned:
    """Views this node's gallery learned from feedback."""

    product_id: str
    views: Mapping[str, U8Array]  # crop per camera
    learned_ms: int


@dataclass(frozen=True, slots=True)
class Incoming:
    """A message from the broker."""

    topic: str
    payload: bytes
    digest: str  # sha256 of the payload


class Backlog:
    """Thread-safe: put from any thread, `take` and `done` from the one worker."""

    def __init__(self, max_bytes: int, max_learned: int) -> None:
        self._max_bytes = max_bytes
        self._max_learned = max_learned
        self._cond = threading.Condition()
        self._learned: deque[Learned] = deque()
        self._messages: OrderedDict[str, Incoming] = OrderedDict()
        self._bytes = 0
        self._busy = False

    @property
    def bytes(self) -> int:
        with self._cond:
            return self._bytes

    def put_learned(self, job: Learned) -> bool:
        """False: too many wait already (not queued)."""
        with self._cond:
            if len(self._learned) >= self._max_learned:
                return False
            self._learned.append(job)
            self._cond.notify_all()
            return True

    def put_message(self, job: Incoming) -> bool:
        """False: over the byte bound (not queued; one message alone always fits)."""
        with self._cond:
            old = self._messages.pop(job.topic, None)
            left = self._bytes - (len(old.payload) if old is not None else 0)
            if self._messages and left + len(job.payload) > self._max_bytes:
                if old is not None:
                    self._messages[job.topic] = old
                return False
            self._messages[job.topic] = job
            self._bytes = left + len(job.payload)
            self._cond.notify_all()
            return True

    def take(self, timeout_s: float) -> Learned | Incoming | None:
        """The next job (learned views first), or None after `timeout_s` without one."""
        with self._cond:
            if not self._learned and not self._messages:
                self._cond.wait(timeout_s)
            job: Learned | Incoming
            if self._learned:
                job = self._learned.popleft()
            elif self._messages:
                _, job = self._messages.popitem(last=False)
                self._bytes -= len(job.payload)
            else:
                return None
            self._busy = True
            return job

    def take_learned(self) -> list[Learned]:
        """Every learned job still waiting (the worker's last act before it stops)."""
        with self._cond:
            jobs = list(self._learned)
            self._learned.clear()
            self._busy = bool(jobs)
            return jobs

    def done(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing waits and the worker is between jobs."""
        with self._cond:
            return self._cond.wait_for(
                lambda: not (self._busy or self._learned or self._messages), timeout_s)
