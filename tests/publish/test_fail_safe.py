"""Acceptance: a stalled item's fail-safe verdict reaches the controller before its deadline."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from edge.clock import WallClock
from edge.config import DecisionConfig
from edge.types import Announcement, Decision, Verdict
from edge.verdicts.deadlines import DeadlineScheduler
from tests.publish.helpers import validator

if TYPE_CHECKING:
    from collections.abc import Callable

    from edge.publish.broker import MosquittoBroker
    from tests.publish.conftest import NodeSide
    from tests.publish.helpers import Collector


def _ann(item_id: str, t: float) -> Announcement:
    return Announcement(item_id=item_id, product_id="box-small", induct_time_ms=t, received_ms=t)


def _verdict(item_id: str, now: float, deadline: float, decision: Decision) -> Verdict:
    return Verdict(item_id=item_id, product_id="box-small", decision=decision, reasons=(),
                   scores=None, threshold_version="t", model_versions={}, findings=(),
                   captured_ms=now - 50, decided_ms=now, deadline_ms=deadline)


def test_stalled_inference_gets_timeout_fail_safe_then_late_verdict_over_mqtt(
        mosquitto: MosquittoBroker, node_factory: Callable[..., NodeSide],
        collector_factory: Callable[..., Collector]) -> None:
    """Acceptance: an item whose inference stalls gets its `timeout` fail-safe verdict at the
    controller before its deadline; the real verdict arrives later flagged `late`."""
    collector = collector_factory(mosquitto, "+/+/+/verdict")
    node = node_factory(mosquitto)
    clock = WallClock()
    sched = DeadlineScheduler(node.publisher, DecisionConfig(fail_safe="sideline"), clock,
                              safety_margin_ms=150.0, tick_s=0.01)
    sched.start()
    try:
        deadline = clock.now_ms() + 600
        sched.announce(_ann("stalled", clock.now_ms()), deadline)
        sched.mark_seen("stalled", clock.now_ms())
        assert collector.wait_for(lambda ms: len(ms) >= 1, 2)
        arrived_ms = clock.now_ms()
        threading.Event().wait(max(0.0, (deadline - clock.now_ms()) / 1000) + 0.2)
        sched.complete(_verdict("stalled", clock.now_ms(), deadline, Decision.PASS))
        assert collector.wait_for(lambda ms: len(ms) >= 2, 2)
    finally:
        sched.stop()
    first, second = (m.json() for m in collector.on("/verdict"))
    for payload in (first, second):
        validator("verdict").validate(payload)
    assert arrived_ms < deadline
    assert (first["fail_safe"], first["reasons"], first["decision"], first["late"]) == (
        True, ["timeout"], "sideline", False)
    assert first["timestamps"]["published"] <= first["deadline"]
    assert (second["late"], second["fail_safe"], second["decision"]) == (True, False, "pass")
    assert second["seq"] == first["seq"] + 1
    assert sched.stats().deadline_misses == 0
