"""Results as the OPC UA server shows them: one per verdict, and the last N kept by item ID."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass

from edge.config import NodeConfig
from edge.publish.opcua.contract import DECISION_VALUES, reasons_mask
from edge.publish.payloads import verdict_payload
from edge.types import Verdict

#: `FusedScore` of a verdict without scores (PLCs handle a sentinel better than a NaN).
NO_SCORE = -1.0


@dataclass(frozen=True, slots=True)
class Result:
    """One verdict, in the contract's terms (`contract.RESULT_FIELDS`)."""

    seq: int
    item_id: str
    product_id: str
    decision: int
    fail_safe: bool
    late: bool
    reasons: int
    fused_score: float
    deadline_ms: int
    result_json: str
    #: when `offer()` took the verdict (time.monotonic): latency inside the node
    offered_mono: float = 0.0

    @property
    def seq32(self) -> int:
        """`Seq` as a UInt32 (the outbox's seq wraps there after 4 billion verdicts)."""
        return self.seq & 0xFFFF_FFFF

    def values(self) -> dict[str, object]:
        """Field name -> value, for every name in `RESULT_FIELDS`."""
        return {"Seq": self.seq32, "ItemId": self.item_id, "ProductId": self.product_id,
                "Decision": self.decision, "FailSafe": self.fail_safe, "Late": self.late,
                "Reasons": self.reasons, "FusedScore": self.fused_score,
                "DeadlineMs": self.deadline_ms, "ResultJson": self.result_json}


def result_from_verdict(verdict: Verdict, seq: int, node: NodeConfig, published_ms: float,
                        offered_mono: float = 0.0) -> Result:
    fused = verdict.scores.fused if verdict.scores is not None else None
    payload = verdict_payload(verdict, node_id=node.node_id, line_id=node.line_id, seq=seq,
                              published_ms=published_ms)
    return Result(
        seq=seq, item_id=verdict.item_id, product_id=verdict.product_id or "",
        decision=DECISION_VALUES[verdict.decision], fail_safe=verdict.fail_safe,
        late=verdict.late, reasons=reasons_mask(verdict.reasons),
        fused_score=float(fused) if fused is not None and math.isfinite(fused) else NO_SCORE,
        deadline_ms=round(verdict.deadline_ms),
        result_json=json.dumps(payload, separators=(",", ":"), ensure_ascii=False),
        offered_mono=offered_mono)


class ResultStore:
    """The last `capacity` results by item ID: a newer result for an item (a late verdict
    after its fail-safe one) replaces the older one and counts as the most recent."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._by_item: OrderedDict[str, Result] = OrderedDict()

    def add(self, result: Result) -> None:
        self._by_item.pop(result.item_id, None)
        self._by_item[result.item_id] = result
        while len(self._by_item) > self.capacity:
            self._by_item.popitem(last=False)

    def get(self, item_id: str) -> Result | None:
        return self._by_item.get(item_id)

    def item_ids(self) -> list[str]:
        """Oldest first."""
        return list(self._by_item)

    def __len__(self) -> int:
        return len(self._by_item)
