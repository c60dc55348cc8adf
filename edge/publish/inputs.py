"""Incoming messages: parse, check against the node's state, hand on or reject.

Every input ends in exactly one of two places: the node's callback
(`on_announcement` / `on_feedback`) or a rejection, which is counted by
reason, logged as one structured line and reported to the publisher's
`report` hook (which sends it to ``…/events``). Nothing here raises.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from typing import TYPE_CHECKING

import structlog

from edge.publish.payloads import InputRejected, parse_feedback, parse_induct

if TYPE_CHECKING:
    from collections.abc import Callable, Collection

    from edge.clock import Clock
    from edge.publish.topics import Topics
    from edge.types import Announcement, Feedback

log = structlog.get_logger(__name__)

#: Item IDs remembered for duplicate and unknown-item checks (hours of traffic).
REMEMBERED_ITEMS = 200_000


class _BoundedSet:
    def __init__(self, capacity: int) -> None:
        self._items: OrderedDict[str, None] = OrderedDict()
        self._capacity = capacity

    def add(self, key: str) -> bool:
        """Add `key`; False if it was already there."""
        if key in self._items:
            return False
        self._items[key] = None
        if len(self._items) > self._capacity:
            self._items.popitem(last=False)
        return True

    def __contains__(self, key: object) -> bool:
        return key in self._items


class InputGate:
    """Turns raw induct/feedback payloads into typed values, or counted rejections."""

    def __init__(self, topics: Topics, clock: Clock, *,
                 on_announcement: Callable[[Announcement], None],
                 on_feedback: Callable[[Feedback], None],
                 report: Callable[[str, InputRejected, int], None],
                 known_products: Collection[str] | None = None,
                 item_known: Callable[[str], bool] | None = None) -> None:
        self._topics = topics
        self._clock = clock
        self._on_announcement = on_announcement
        self._on_feedback = on_feedback
        self._report = report
        self._known_products = frozenset(known_products) if known_products is not None else None
        self._item_known = item_known
        self._lock = threading.Lock()
        self._announced = _BoundedSet(REMEMBERED_ITEMS)
        self._judged = _BoundedSet(REMEMBERED_ITEMS)
        self.received = 0
        self.accepted: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()

    def remember(self, item_id: str) -> None:
        """The node published a verdict for `item_id` (feedback may refer to it)."""
        with self._lock:
            self._judged.add(item_id)

    def _known(self, item_id: str) -> bool:
        with self._lock:
            if item_id in self._announced or item_id in self._judged:
                return True
        return self._item_known is not None and self._item_known(item_id)

    def handle(self, topic: str, payload: bytes) -> None:
        now = self._clock.now_ms()
        with self._lock:
            self.received += 1
        try:
            if topic == self._topics.induct:
                ann = parse_induct(payload, now, self._known_products)
                with self._lock:
                    fresh = self._announced.add(ann.item_id)
                if not fresh:
                    raise InputRejected("duplicate_item",
                                        f"item {ann.item_id!r} was already announced", "item_id")
                self._accept("induct", lambda: self._on_announcement(ann))
            elif topic == self._topics.feedback:
                fb = parse_feedback(payload, now, self._known_products)
                if not self._known(fb.item_id):
                    raise InputRejected("unknown_item",
                                        f"feedback for unknown item {fb.item_id!r}", "item_id")
                self._accept("feedback", lambda: self._on_feedback(fb))
            else:
                log.warning("mqtt.unexpected_topic", topic=topic)
        except InputRejected as exc:
            with self._lock:
                self.rejected[exc.reason] += 1
            log.warning("mqtt.input_rejected", topic=topic, reason=exc.reason, field=exc.field,
                        error=str(exc), size=len(payload))
            self._report(topic, exc, len(payload))

    def _accept(self, kind: str, deliver: Callable[[], None]) -> None:
        with self._lock:
            self.accepted[kind] += 1
        try:
            deliver()
        except Exception:
            log.exception("mqtt.input_callback_failed", kind=kind)

    def snapshot(self) -> tuple[int, dict[str, int], dict[str, int]]:
        with self._lock:
            return self.received, dict(self.accepted), dict(self.rejected)
