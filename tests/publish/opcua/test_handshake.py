"""The PLC block's handshake and the results kept, as plain logic (no server)."""

from __future__ import annotations

import dataclasses

from edge.config import NodeConfig
from edge.publish.opcua.handshake import Ack, PlcHandshake
from edge.publish.opcua.results import NO_SCORE, Result, ResultStore, result_from_verdict
from edge.types import Decision, Reason
from tests.publish.helpers import make_verdict

T0 = 1_700_000_000_000.0


def _result(item_id: str, seq: int, deadline_ms: float) -> Result:
    return result_from_verdict(make_verdict(item_id, now_ms=T0, deadline_in_ms=deadline_ms - T0),
                               seq, NodeConfig(), T0)


def test_a_result_waits_for_its_ack_and_only_then_the_next_is_shown() -> None:
    """One result in the block until its Seq is acknowledged; a wrong Seq changes nothing."""
    hs = PlcHandshake()
    hs.push(_result("A", 1, T0 + 5000))
    hs.push(_result("B", 2, T0 + 5000))
    step = hs.step(T0)
    assert [r.item_id for r in step.shown] == ["A"]
    assert hs.step(T0 + 100).shown == []
    assert hs.ack(2, T0 + 150) is Ack.WRONG
    assert hs.ack(1, T0 + 200) is Ack.TAKEN
    assert [r.item_id for r in hs.step(T0 + 200).shown] == ["B"]
    assert hs.ack(1, T0 + 250) is Ack.WRONG  # no longer the Seq shown
    assert hs.acked == 1


def test_an_unacknowledged_result_is_withdrawn_at_its_deadline_and_counted_missed() -> None:
    """Past its deadline: withdrawn, missed ("deadline"); a later ack of it is late."""
    hs = PlcHandshake()
    hs.push(_result("A", 1, T0 + 500))
    hs.push(_result("B", 2, T0 + 5000))
    hs.step(T0)
    assert hs.next_due_ms() == T0 + 500
    step = hs.step(T0 + 500)
    assert [(m.result.item_id, m.why) for m in step.missed] == [("A", "deadline")]
    assert step.withdrawn is not None
    assert [r.item_id for r in step.shown] == ["B"]
    assert hs.missed == 1
    assert hs.ack(1, T0 + 600) is Ack.WRONG  # B is shown now


def test_queued_results_whose_deadline_passes_behind_a_slow_ack_are_missed_at_once() -> None:
    """A result that could only be shown after its deadline is never shown."""
    hs = PlcHandshake()
    hs.push(_result("A", 1, T0 + 5000))
    hs.push(_result("B", 2, T0 + 300))
    hs.push(_result("C", 3, T0 + 5000))
    hs.step(T0)
    step = hs.step(T0 + 400)  # A still waiting; B's deadline has passed behind it
    assert [m.result.item_id for m in step.missed] == ["B"]
    assert hs.ack(1, T0 + 450) is Ack.TAKEN
    assert [r.item_id for r in hs.step(T0 + 450).shown] == ["C"]
    assert hs.missed == 1


def test_ack_timeout_withdraws_a_result_before_its_deadline() -> None:
    """With ack_timeout_ms, a result waits at most that long (why: "ack_timeout")."""
    hs = PlcHandshake(ack_timeout_ms=200.0)
    hs.push(_result("A", 1, T0 + 5000))
    hs.step(T0)
    step = hs.step(T0 + 200)
    assert [(m.result.item_id, m.why) for m in step.missed] == [("A", "ack_timeout")]
    assert hs.ack(1, T0 + 300) is Ack.LATE


def test_without_the_handshake_every_result_is_shown_as_it_comes() -> None:
    """handshake: false: no ack awaited, nothing missed, each result shown in order."""
    hs = PlcHandshake(required=False)
    for i in range(3):
        hs.push(_result(f"I{i}", i, T0 - 1))  # even past its deadline
    step = hs.step(T0)
    assert [r.item_id for r in step.shown] == ["I0", "I1", "I2"]
    assert step.missed == []
    assert not hs.waiting


def test_results_carry_the_verdict_and_the_store_keeps_the_newest_by_item() -> None:
    """A result has the verdict's fields (no score: -1; Seq as UInt32), and the store keeps
    the last N items, a newer result for an item replacing the older one."""
    verdict = make_verdict("R1", decision=Decision.SIDELINE, now_ms=T0)
    result = result_from_verdict(verdict, 2**32 + 5, NodeConfig(), T0)
    assert result.seq32 == 5
    assert result.decision == 1
    assert result.reasons == 1 << 0
    assert result.values()["DeadlineMs"] == round(verdict.deadline_ms)
    fail_safe = dataclasses.replace(make_verdict("R2", now_ms=T0), scores=None,
                                    fail_safe=True, reasons=(Reason.TIMEOUT,))
    fs = result_from_verdict(fail_safe, 9, NodeConfig(), T0)
    assert fs.fused_score == NO_SCORE
    assert fs.fail_safe
    assert fs.reasons == 1 << 3
    store = ResultStore(2)
    for item, seq in (("A", 1), ("B", 2), ("A", 3), ("C", 4)):
        store.add(_result(item, seq, T0 + 1000))
    assert store.item_ids() == ["A", "C"]
    assert store.get("A") is not None
    assert store.get("A").seq == 3  # type: ignore[union-attr]
    assert store.get("B") is None
