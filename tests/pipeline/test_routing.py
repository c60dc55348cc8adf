"""Where verdicts go after the scheduler: MQTT first, then every other controller channel."""

from __future__ import annotations

from edge.pipeline.routing import Broadcast
from edge.types import Decision, Verdict


def _verdict(item_id: str) -> Verdict:
    return Verdict(item_id=item_id, product_id=None, decision=Decision.PASS, reasons=(),
                   scores=None, threshold_version="t", model_versions={}, findings=(),
                   captured_ms=None, decided_ms=0.0, deadline_ms=1.0)


class _Outbox:
    """The MQTT publisher as the scheduler sees it: numbers each verdict."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def publish_verdict(self, verdict: Verdict) -> int:
        self.sent.append(verdict.item_id)
        return len(self.sent)


class _Channel:
    def __init__(self, broken: bool = False) -> None:
        self.broken = broken
        self.got: list[tuple[str, int]] = []

    def offer(self, verdict: Verdict, seq: int) -> None:
        if self.broken:
            raise RuntimeError("injected: channel bug")
        self.got.append((verdict.item_id, seq))

    def start(self) -> None:
        return None

    def stop(self, timeout_s: float = 5.0) -> None:
        return None


def test_every_channel_gets_each_verdict_with_the_outbox_seq_and_a_broken_one_costs_nothing(
        ) -> None:
    """Channels receive every verdict numbered as on MQTT; one that raises loses only its own
    copy: MQTT and the other channels still get every verdict."""
    outbox, broken, plc = _Outbox(), _Channel(broken=True), _Channel()
    broadcast = Broadcast(outbox, [broken, plc])
    seqs = [broadcast.publish_verdict(_verdict(f"I-{i}")) for i in range(3)]
    assert seqs == [1, 2, 3]
    assert outbox.sent == ["I-0", "I-1", "I-2"]
    assert plc.got == [("I-0", 1), ("I-1", 2), ("I-2", 3)]
