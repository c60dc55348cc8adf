"""Per-item divert deadlines: the single path through which verdicts reach the publisher.

Each announced item has a divert deadline. If no verdict has completed
``safety_margin_ms`` before it, the scheduler publishes a fail-safe verdict on
time (decision ``decision.fail_safe``; reason ``timeout`` if the cameras saw
the item, ``not_seen`` if they never did). A real verdict that completes after
that point is published with ``late=True``: audit only, never an actuation.
Verdicts for items nobody announced (generated IDs, reason ``unannounced``)
pass straight through.

Accounting (exported by the node): ``admitted = passed + sidelined + fail_safe
+ in_flight`` holds at every instant. ``passed``/``sidelined`` count real,
on-time verdicts; ``by_decision``/``by_reason`` count every actuation verdict
(fail-safe included); ``late`` counts audit verdicts; a *deadline miss* is an
actuation verdict (real or fail-safe) published after its deadline.
"""

from __future__ import annotations

import dataclasses
import heapq
import threading
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import structlog

from edge.types import Decision, Reason, Verdict
from edge.workers import WorkerThread

if TYPE_CHECKING:
    from collections.abc import Mapping

    from edge.clock import Clock
    from edge.config import DecisionConfig
    from edge.types import Announcement

log = structlog.get_logger(__name__)

#: The window of the hourly rates in `DeadlineStats`.
_HOUR_MS = 3_600_000.0


class VerdictSink(Protocol):
    def publish_verdict(self, verdict: Verdict) -> int: ...


@dataclass(frozen=True, slots=True)
class DeadlineStats:
    admitted: int
    passed: int
    sidelined: int
    fail_safe: int
    in_flight: int
    late: int
    deadline_misses: int
    unannounced: int
    duplicates: int
    publish_errors: int
    by_decision: Mapping[str, int] = field(default_factory=dict)
    by_reason: Mapping[str, int] = field(default_factory=dict)
    #: actuation verdicts given out in the last hour, and the shares sidelined / fail-safe
    verdicts_1h: int = 0
    sideline_rate_1h: float | None = None
    fail_safe_rate_1h: float | None = None
    last_verdict_ms: float | None = None  # when the latest actuation verdict went out


@dataclass(slots=True)
class _Item:
    announcement: Announcement
    deadline_ms: float
    captured_ms: float | None = None


class DeadlineScheduler:
    """Owns every in-flight item's deadline; thread-safe; one named thread."""

    def __init__(self, sink: VerdictSink, decision: DecisionConfig, clock: Clock,
                 safety_margin_ms: float, *, threshold_version: str = "",
                 model_versions: Mapping[str, str] | None = None, tick_s: float = 0.05,
                 remembered: int = 100_000) -> None:
        self._sink = sink
        self._fail_safe = Decision(decision.fail_safe)
        self._clock = clock
        self._margin = safety_margin_ms
        self._threshold_version = threshold_version
        self._model_versions = dict(model_versions or {})
        self._tick_s = tick_s
        self._remembered = remembered
        self._lock = threading.RLock()
        self._items: dict[str, _Item] = {}
        self._heap: list[tuple[float, str]] = []
        self._done: OrderedDict[str, bool] = OrderedDict()  # item -> True if fail-safed
        self._counts: Counter[str] = Counter()
        self._by_decision: Counter[str] = Counter()
        self._by_reason: Counter[str] = Counter()
        # (decided ms, sidelined, fail-safe) of the last hour's actuation verdicts
        self._hour: deque[tuple[float, bool, bool]] = deque()
        self._wake = threading.Event()
        self._worker: WorkerThread | None = None
        self._closed = False  # drained for shutdown: nothing new is inspected

    # --- lifecycle ----------------------------------------------------------------------

    def set_versions(self, threshold_version: str, model_versions: Mapping[str, str]) -> None:
        """After a reload: fail-safe verdicts name the thresholds and models now in use."""
        with self._lock:
            self._threshold_version = threshold_version
            self._model_versions = dict(model_versions)

    def start(self) -> None:
        with self._lock:
            self._closed = False
        self._worker = WorkerThread("deadlines", self._run, wake=self._wake.set)
        self._worker.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        if self._worker is not None:
            self._worker.stop(timeout_s)
            self._worker = None

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.check()
            except Exception:  # never let one bad publish end deadline keeping
                log.exception("deadlines.check_failed")
            with self._lock:
                due = self._heap[0][0] if self._heap else None
            wait = self._tick_s
            if due is not None:
                wait = min(max((due - self._clock.now_ms()) / 1000.0, 0.0), self._tick_s)
            if wait > 0:
                self._wake.wait(wait)
            self._wake.clear()

    # --- inputs from the stages ---------------------------------------------------------

    def announce(self, announcement: Announcement, deadline_ms: float) -> bool:
        """An induct arrived; False for an item already known (nothing changes), and for one
        that arrives after the shutdown drain: it gets its fail-safe verdict at once."""
        with self._lock:
            item_id = announcement.item_id
            if item_id in self._items or item_id in self._done:
                self._counts["duplicates"] += 1
                log.warning("deadlines.duplicate_announcement", item_id=item_id)
                return False
            self._items[item_id] = item = _Item(announcement, deadline_ms)
            self._counts["admitted"] += 1
            if self._closed:
                self._publish_fail_safe(item_id, item, self._clock.now_ms(), (Reason.SHUTDOWN,))
                return False
            heapq.heappush(self._heap, (deadline_ms - self._margin, item_id))
        self._wake.set()
        return True

    def mark_seen(self, item_id: str, captured_ms: float) -> bool:
        """The camera stage tied an item to this announcement; False if not in flight."""
        with self._lock:
            item = self._items.get(item_id)
            if item is None:
                return False
            if item.captured_ms is None or captured_ms > item.captured_ms:
                item.captured_ms = captured_ms
            return True

    def complete(self, verdict: Verdict) -> int | None:
        """Inference decided; publishes on time, late, or straight through.

        Returns the published sequence number, or None if nothing was published
        (a second verdict for a finished item, or a publish error).
        """
        with self._lock:
            now = self._clock.now_ms()
            item = self._items.get(verdict.item_id)
            if item is not None and now >= item.deadline_ms - self._margin:
                self._publish_fail_safe(verdict.item_id, item, now, ())
                item = None
            if item is not None:
                del self._items[verdict.item_id]
                self._remember(verdict.item_id, fail_safed=False)
                self._counts["passed" if verdict.decision is Decision.PASS else "sidelined"] += 1
                return self._publish_actuation(verdict, now)
            fail_safed = self._done.get(verdict.item_id)
            if fail_safed:
                self._counts["late"] += 1
                self._done[verdict.item_id] = False  # one late verdict per item
                return self._publish(dataclasses.replace(verdict, late=True, fail_safe=False))
            if fail_safed is not None:
                self._counts["duplicates"] += 1
                log.warning("deadlines.duplicate_verdict", item_id=verdict.item_id)
                return None
            # Nobody announced it: straight through.
            self._counts["admitted"] += 1
            self._counts["unannounced"] += 1
            self._counts["passed" if verdict.decision is Decision.PASS else "sidelined"] += 1
            self._remember(verdict.item_id, fail_safed=False)
            return self._publish_actuation(verdict, now)

    # --- deadline keeping ---------------------------------------------------------------

    def check(self, now_ms: float | None = None) -> int:
        """Publish fail-safe verdicts for every item due now; returns how many."""
        fired = 0
        with self._lock:
            now = self._clock.now_ms() if now_ms is None else now_ms
            while self._heap and self._heap[0][0] <= now:
                _, item_id = heapq.heappop(self._heap)
                item = self._items.get(item_id)
                if item is None:
                    continue  # completed in time
                self._publish_fail_safe(item_id, item, self._clock.now_ms(), ())
                fired += 1
        return fired

    def drain(self, reason: Reason = Reason.SHUTDOWN) -> int:
        """Fail-safe verdicts now for every item still in flight (shutdown); items announced
        from now on get theirs as they arrive (the MQTT client still delivers while the
        outbox is flushed)."""
        with self._lock:
            self._closed = True
            pending = sorted(self._items.items(), key=lambda kv: kv[1].deadline_ms)
            for item_id, item in pending:
                self._publish_fail_safe(item_id, item, self._clock.now_ms(), (reason,))
            self._heap.clear()
        if pending:
            log.warning("deadlines.drained", items=len(pending), reason=reason.value)
        return len(pending)

    def _publish_fail_safe(self, item_id: str, item: _Item, now: float,
                           extra: tuple[Reason, ...]) -> None:
        del self._items[item_id]
        self._remember(item_id, fail_safed=True)
        self._counts["fail_safe"] += 1
        why = Reason.TIMEOUT if item.captured_ms is not None else Reason.NOT_SEEN
        verdict = Verdict(
            item_id=item_id, product_id=item.announcement.product_id,
            decision=self._fail_safe, reasons=(*extra, why), scores=None,
            threshold_version=self._threshold_version, model_versions=self._model_versions,
            findings=(), captured_ms=item.captured_ms, decided_ms=now,
            deadline_ms=item.deadline_ms, fail_safe=True)
        log.info("deadlines.fail_safe", item_id=item_id, reason=why.value,
                 decision=self._fail_safe.value, ms_to_deadline=round(item.deadline_ms - now, 1))
        self._publish_actuation(verdict, now)

    def _publish_actuation(self, verdict: Verdict, now: float) -> int | None:
        self._by_decision[verdict.decision.value] += 1
        self._hour.append((now, verdict.decision == Decision.SIDELINE, verdict.fail_safe))
        while self._hour and now - self._hour[0][0] > _HOUR_MS:
            self._hour.popleft()
        for r in verdict.reasons:
            self._by_reason[r.value] += 1
        if now > verdict.deadline_ms:
            self._counts["deadline_misses"] += 1
            log.warning("deadlines.missed", item_id=verdict.item_id,
                        ms_late=round(now - verdict.deadline_ms, 1))
        return self._publish(verdict)

    def _publish(self, verdict: Verdict) -> int | None:
        try:
            return self._sink.publish_verdict(verdict)
        except Exception:
            self._counts["publish_errors"] += 1
            log.exception("deadlines.publish_failed", item_id=verdict.item_id)
            return None

    def _remember(self, item_id: str, *, fail_safed: bool) -> None:
        self._done[item_id] = fail_safed
        self._done.move_to_end(item_id)
        while len(self._done) > self._remembered:
            self._done.popitem(last=False)

    # --- accounting ---------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._items)

    def stats(self) -> DeadlineStats:
        now = self._clock.now_ms()
        with self._lock:
            c = self._counts
            hour = [h for h in self._hour if now - h[0] <= _HOUR_MS]
            n = len(hour)
            return DeadlineStats(
                admitted=c["admitted"], passed=c["passed"], sidelined=c["sidelined"],
                fail_safe=c["fail_safe"], in_flight=len(self._items), late=c["late"],
                deadline_misses=c["deadline_misses"], unannounced=c["unannounced"],
                duplicates=c["duplicates"], publish_errors=c["publish_errors"],
                by_decision=dict(self._by_decision), by_reason=dict(self._by_reason),
                verdicts_1h=n,
                sideline_rate_1h=sum(h[1] for h in hour) / n if n else None,
                fail_safe_rate_1h=sum(h[2] for h in hour) / n if n else None,
                last_verdict_ms=self._hour[-1][0] if self._hour else None)
