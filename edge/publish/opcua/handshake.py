"""The PLC block's handshake, as plain logic (the server applies what it decides).

A result is shown in the block (`ResultValid` true) and stays there until the PLC writes its
`Seq` to `ResultAck`; only then is the next one shown. A result whose divert deadline passes
first (or `ack_timeout_ms` after it was shown) is withdrawn and counted as missed by the PLC,
and so is every queued one whose deadline passes while it waits: nothing stale is ever shown.
Without the handshake, each result is shown as it comes.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from edge.publish.opcua.results import Result


class Ack(enum.Enum):
    TAKEN = "taken"  # the result shown, acknowledged in time
    LATE = "late"  # the Seq of the result last shown, after it was withdrawn: nothing to do
    WRONG = "wrong"  # not the Seq shown: refused


@dataclass(frozen=True, slots=True)
class Missed:
    result: Result
    #: "deadline" (its divert deadline passed) or "ack_timeout"
    why: str


@dataclass(slots=True)
class Step:
    """What the block must do now: withdraw, then show (with the handshake, at most one;
    without it, every result that came, in order)."""

    missed: list[Missed] = field(default_factory=list)
    withdrawn: Result | None = None
    shown: list[Result] = field(default_factory=list)


class PlcHandshake:
    def __init__(self, *, required: bool = True, ack_timeout_ms: float | None = None) -> None:
        self.required = required
        self.ack_timeout_ms = ack_timeout_ms
        self._queue: deque[Result] = deque()
        #: the result in the block (shown or withdrawn), and whether it waits for its ack
        self.current: Result | None = None
        self.waiting = False
        self._expires_ms = 0.0
        self._expiry_why = "deadline"
        self.acked = 0
        self.missed = 0

    def push(self, result: Result) -> None:
        self._queue.append(result)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def ack(self, seq32: int, now_ms: float) -> Ack:
        """The PLC wrote `seq32` to ResultAck."""
        current = self.current
        if current is None or seq32 != current.seq32:
            return Ack.WRONG
        if not self.waiting:
            return Ack.LATE
        self.waiting = False
        self.acked += 1
        return Ack.TAKEN

    def step(self, now_ms: float) -> Step:
        out = Step()
        if self.waiting and now_ms >= self._expires_ms:
            assert self.current is not None
            out.missed.append(Missed(self.current, self._expiry_why))
            out.withdrawn = self.current
            self.waiting = False
        if self.waiting:
            self._drop_stale(now_ms, out)
            return out
        while self._queue:
            result = self._queue.popleft()
            if result.deadline_ms <= now_ms and self.required:
                out.missed.append(Missed(result, "deadline"))
                continue
            self._show(result, now_ms)
            out.shown.append(result)
            if self.required:
                break
        self.missed += len(out.missed)
        return out

    def _drop_stale(self, now_ms: float, out: Step) -> None:
        """Queued results whose deadline passed behind the one waiting: missed now, not when
        their turn comes."""
        fresh = [r for r in self._queue if r.deadline_ms > now_ms]
        if len(fresh) < len(self._queue):
            out.missed += [Missed(r, "deadline") for r in self._queue if r.deadline_ms <= now_ms]
            self._queue = deque(fresh)
        self.missed += len(out.missed)

    def _show(self, result: Result, now_ms: float) -> None:
        self.current = result
        self.waiting = self.required
        self._expires_ms, self._expiry_why = float(result.deadline_ms), "deadline"
        if self.ack_timeout_ms is not None and now_ms + self.ack_timeout_ms < self._expires_ms:
            self._expires_ms, self._expiry_why = now_ms + self.ack_timeout_ms, "ack_timeout"

    def next_due_ms(self) -> float | None:
        """When `step` next has something to do without new input (None: nothing due)."""
        due = [float(r.deadline_ms) for r in self._queue] if self.required else []
        if self.waiting:
            due.append(self._expires_ms)
        elif self._queue:
            return float("-inf")  # show one now
        return min(due) if due else None

    def drain(self) -> list[Result]:
        """At shutdown: what was never shown."""
        left = list(self._queue)
        self._queue.clear()
        return left
