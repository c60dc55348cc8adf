"""Divert deadlines: fail-safe verdicts on time, late verdicts for audit, exact accounting."""

from __future__ import annotations

import dataclasses
import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from edge.clock import ManualClock, WallClock
from edge.config import DecisionConfig
from edge.types import Announcement, Decision, Reason, Verdict
from edge.verdicts.deadlines import DeadlineScheduler

T0 = 1_700_000_000_000.0


class Recorder:
    """A verdict sink that remembers what was published and when (by the scheduler's clock)."""

    def __init__(self, clock: ManualClock | WallClock) -> None:
        self.clock = clock
        self.published: list[tuple[float, Verdict]] = []
        self._lock = threading.Lock()

    def publish_verdict(self, verdict: Verdict) -> int:
        with self._lock:
            self.published.append((self.clock.now_ms(), verdict))
            return len(self.published)

    @property
    def verdicts(self) -> list[Verdict]:
        return [v for _, v in self.published]


def _ann(item_id: str, t: float = T0) -> Announcement:
    return Announcement(item_id=item_id, product_id="box-small", induct_time_ms=t, received_ms=t)


def _verdict(item_id: str, now: float, deadline: float,
             decision: Decision = Decision.PASS, reasons: tuple[Reason, ...] = ()) -> Verdict:
    return Verdict(item_id=item_id, product_id="box-small", decision=decision, reasons=reasons,
                   scores=None, threshold_version="t", model_versions={}, findings=(),
                   captured_ms=now - 50, decided_ms=now, deadline_ms=deadline)


def _scheduler(clock: ManualClock, fail_safe: str = "sideline",
               margin: float = 400.0) -> tuple[DeadlineScheduler, Recorder]:
    sink = Recorder(clock)
    return DeadlineScheduler(sink, DecisionConfig(fail_safe=fail_safe),  # type: ignore[arg-type]
                             clock, margin, threshold_version="thr-1"), sink


def _balanced(s: DeadlineScheduler) -> bool:
    st_ = s.stats()
    return st_.admitted == st_.passed + st_.sidelined + st_.fail_safe + st_.in_flight


def test_verdict_in_time_is_published_once_as_decided() -> None:
    """A verdict completed before deadline minus margin goes out unchanged, once."""
    clock = ManualClock(T0)
    sched, sink = _scheduler(clock)
    sched.announce(_ann("a"), T0 + 3000)
    sched.mark_seen("a", T0 + 1000)
    clock.advance(1500)
    real = _verdict("a", clock.now_ms(), T0 + 3000, Decision.SIDELINE, (Reason.DAMAGE,))
    assert sched.complete(real) == 1
    clock.advance(5000)
    assert sched.check() == 0
    assert sink.verdicts == [real]
    stats = sched.stats()
    assert (stats.admitted, stats.sidelined, stats.fail_safe, stats.in_flight) == (1, 1, 0, 0)
    assert stats.by_reason == {"damage": 1}


def test_fail_safe_on_time_with_timeout_or_not_seen() -> None:
    """No verdict by deadline minus margin: a fail-safe verdict (configured decision) goes out
    then, reason `timeout` for a seen item and `not_seen` for one the cameras never saw."""
    clock = ManualClock(T0)
    sched, sink = _scheduler(clock, fail_safe="pass")
    sched.announce(_ann("seen"), T0 + 3000)
    sched.announce(_ann("ghost"), T0 + 3500)
    sched.mark_seen("seen", T0 + 1200)
    clock.set(T0 + 2599)
    assert sched.check() == 0
    clock.set(T0 + 2600)
    assert sched.check() == 1
    clock.set(T0 + 3100)
    assert sched.check() == 1
    (t1, seen), (t2, ghost) = sink.published
    assert (seen.reasons, seen.decision, seen.fail_safe, seen.captured_ms) == (
        (Reason.TIMEOUT,), Decision.PASS, True, T0 + 1200)
    assert (ghost.reasons, ghost.captured_ms) == ((Reason.NOT_SEEN,), None)
    assert t1 < seen.deadline_ms
    assert t2 < ghost.deadline_ms
    assert sched.stats().deadline_misses == 0
    assert _balanced(sched)


def test_real_verdict_after_fail_safe_is_late_and_audit_only() -> None:
    """The real verdict that follows a fail-safe is published with late=True (never as an
    actuation); a second one for the same item is dropped."""
    clock = ManualClock(T0)
    sched, sink = _scheduler(clock)
    sched.announce(_ann("slow"), T0 + 1000)
    sched.mark_seen("slow", T0 + 100)
    clock.set(T0 + 700)
    sched.check()
    clock.set(T0 + 1500)
    real = _verdict("slow", clock.now_ms(), T0 + 1000)
    assert sched.complete(real) is not None
    assert sched.complete(real) is None
    fail_safe, late = sink.verdicts
    assert fail_safe.fail_safe
    assert fail_safe.decision is Decision.SIDELINE
    assert late == dataclasses.replace(real, late=True)
    stats = sched.stats()
    assert (stats.fail_safe, stats.late, stats.passed, stats.duplicates) == (1, 1, 0, 1)
    assert stats.deadline_misses == 0  # the late verdict is audit, not a missed actuation
    assert _balanced(sched)


def test_verdict_inside_the_margin_triggers_fail_safe_first() -> None:
    """A verdict that completes inside the safety margin, before the scheduler thread ran,
    still yields the fail-safe first and the real verdict as late."""
    clock = ManualClock(T0)
    sched, sink = _scheduler(clock)
    sched.announce(_ann("x"), T0 + 1000)
    clock.set(T0 + 800)
    sched.complete(_verdict("x", clock.now_ms(), T0 + 1000))
    assert [(v.fail_safe, v.late) for v in sink.verdicts] == [(True, False), (False, True)]


def test_unannounced_items_pass_straight_through_and_misses_are_counted() -> None:
    """Verdicts for items nobody announced are published as they are and admitted; one
    published after its own deadline counts as a deadline miss."""
    clock = ManualClock(T0)
    sched, sink = _scheduler(clock)
    v = _verdict("gen-1", T0, T0 + 500, Decision.SIDELINE, (Reason.UNANNOUNCED,))
    sched.complete(v)
    clock.advance(1000)
    sched.complete(_verdict("gen-2", clock.now_ms(), T0 + 500))
    assert sink.verdicts[0] == v
    stats = sched.stats()
    assert (stats.admitted, stats.unannounced, stats.deadline_misses) == (2, 2, 1)
    assert stats.by_decision == {"sideline": 1, "pass": 1}
    assert _balanced(sched)


def test_duplicate_announcement_changes_nothing() -> None:
    """Announcing an item twice is refused and counted."""
    clock = ManualClock(T0)
    sched, _ = _scheduler(clock)
    assert sched.announce(_ann("d"), T0 + 1000)
    assert not sched.announce(_ann("d"), T0 + 9000)
    assert sched.stats().admitted == 1
    assert sched.stats().duplicates == 1
    assert not sched.mark_seen("nobody", T0)


def test_drain_fail_safes_everything_in_flight_with_shutdown_reason() -> None:
    """On shutdown every item still in flight gets its fail-safe verdict immediately."""
    clock = ManualClock(T0)
    sched, sink = _scheduler(clock)
    sched.announce(_ann("a"), T0 + 9000)
    sched.announce(_ann("b"), T0 + 8000)
    sched.mark_seen("a", T0 + 10)
    assert sched.drain() == 2
    assert [(v.item_id, v.reasons) for v in sink.verdicts] == [
        ("b", (Reason.SHUTDOWN, Reason.NOT_SEEN)), ("a", (Reason.SHUTDOWN, Reason.TIMEOUT))]
    assert sched.stats().in_flight == 0
    assert _balanced(sched)


ops = st.lists(st.tuples(st.sampled_from(["announce", "seen", "complete", "tick"]),
                         st.integers(0, 7), st.integers(0, 1500)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(script=ops)
def test_every_announced_item_gets_exactly_one_actuation(script: list[tuple[str, int, int]]
                                                          ) -> None:
    """Whatever order announcements, sightings, verdicts and time come in: each announced
    item gets exactly one actuation verdict, never after its deadline while the scheduler
    keeps up; late verdicts only follow a fail-safe; the accounting always balances."""
    clock = ManualClock(T0)
    sched, sink = _scheduler(clock, margin=200.0)
    for op, n, ms in script:
        item = f"i{n}"
        if op == "announce":
            sched.announce(_ann(item, clock.now_ms()), clock.now_ms() + 300 + ms)
        elif op == "seen":
            sched.mark_seen(item, clock.now_ms())
        elif op == "complete":
            sched.complete(_verdict(item, clock.now_ms(), clock.now_ms() + ms))
        else:
            for _ in range(ms // 50):
                clock.advance(50)
                sched.check()
        assert _balanced(sched)
    sched.drain()
    actuations: dict[str, int] = {}
    for t, v in sink.published:
        if v.late:
            assert actuations.get(v.item_id) == 1
            continue
        actuations[v.item_id] = actuations.get(v.item_id, 0) + 1
        if v.fail_safe and Reason.SHUTDOWN not in v.reasons:
            assert t <= v.deadline_ms
    assert all(n == 1 for n in actuations.values())
    assert sched.stats().deadline_misses == 0


def test_concurrent_stages_keep_the_accounting_balanced() -> None:
    """Camera, inference and MQTT threads calling at once: nothing lost, nothing doubled."""
    clock = WallClock()
    sink = Recorder(clock)
    sched = DeadlineScheduler(sink, DecisionConfig(), clock, 20.0, tick_s=0.005)
    sched.start()
    n = 300

    def announcer() -> None:
        for i in range(n):
            sched.announce(_ann(f"c{i}", clock.now_ms()), clock.now_ms() + 30 + (i % 40))

    def decider() -> None:
        for i in range(n):
            sched.mark_seen(f"c{i}", clock.now_ms())
            sched.complete(_verdict(f"c{i}", clock.now_ms(), clock.now_ms() + 100))

    threads = [threading.Thread(target=f, name=f.__name__) for f in (announcer, decider)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    threading.Event().wait(0.2)
    sched.stop()
    sched.drain()
    stats = sched.stats()
    assert _balanced(sched)
    assert stats.in_flight == 0
    items = {v.item_id for v in sink.verdicts if not v.late}
    assert items == {f"c{i}" for i in range(n)}
    assert len([v for v in sink.verdicts if not v.late]) == len(items)


def test_fail_safe_verdicts_name_the_thresholds_and_models_in_use_after_a_reload() -> None:
    """An audit of a fail-safe verdict must find the versions that were live when it was
    made: a reload between two items shows in the second one's verdict only."""
    clock = ManualClock(T0)
    sched, sink = _scheduler(clock)
    sched.announce(_ann("before"), T0 + 1000)
    sched.announce(_ann("after"), T0 + 3000)
    clock.set(T0 + 700)
    assert sched.check() == 1
    sched.set_versions("thr-2", {"damage": "2.0.0", "embedding": "2.0.0"})
    clock.set(T0 + 2700)
    assert sched.check() == 1
    before, after = sink.verdicts
    assert (before.threshold_version, before.model_versions) == ("thr-1", {})
    assert (after.threshold_version, after.model_versions) == (
        "thr-2", {"damage": "2.0.0", "embedding": "2.0.0"})


def test_an_item_announced_after_the_shutdown_drain_gets_its_fail_safe_at_once() -> None:
    """The MQTT client still delivers inducts while the outbox is flushed on shutdown: such an
    item is admitted and fail-safed there and then, never left without a verdict."""
    clock = ManualClock(T0)
    sched, sink = _scheduler(clock)
    assert sched.drain() == 0
    assert not sched.announce(_ann("late-induct"), T0 + 9000)
    assert [(v.item_id, v.reasons, v.fail_safe) for v in sink.verdicts] == [
        ("late-induct", (Reason.SHUTDOWN, Reason.NOT_SEEN), True)]
    assert sched.stats().in_flight == 0
    assert _balanced(sched)
    assert not sched.announce(_ann("late-induct"), T0 + 9000)  # a repeat changes nothing
    assert len(sink.verdicts) == 1


def test_hourly_rates_count_the_last_hours_actuation_verdicts() -> None:
    """The status's sideline and fail-safe rates cover the last hour of actuation verdicts:
    older ones fall out of them, and the latest verdict's time is kept."""
    clock = ManualClock(T0)
    sched, _ = _scheduler(clock)
    assert sched.stats().sideline_rate_1h is None
    for i, decision in enumerate((Decision.SIDELINE, Decision.PASS, Decision.PASS)):
        sched.announce(_ann(f"i{i}"), clock.now_ms() + 3000)
        sched.complete(_verdict(f"i{i}", clock.now_ms(), clock.now_ms() + 3000, decision))
    sched.announce(_ann("late"), clock.now_ms() + 1000)
    clock.advance(1000)
    sched.check()  # no verdict by the deadline less the margin: fail-safe sideline
    stats = sched.stats()
    assert stats.verdicts_1h == 4
    assert stats.sideline_rate_1h == 0.5
    assert stats.fail_safe_rate_1h == 0.25
    assert stats.last_verdict_ms == clock.now_ms()
    clock.advance(3_600_000 - 500)  # the first three are now over an hour old
    stats = sched.stats()
    assert stats.verdicts_1h == 1
    assert stats.sideline_rate_1h == 1.0
