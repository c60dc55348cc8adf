"""Learning from the controller's feedback: labels for the audit trail, and a changed
packaging's look taught to the reference gallery.

Feedback arrives on the MQTT client's network thread, which also hands over PUBACKs: the
embedding and the bank file written for a `packaging_changed` run on a thread of their own.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import structlog

from edge.audit.store import SnapshotStore
from edge.infer.inspector import ItemInspector
from edge.types import Feedback, ItemRecord, U8Array

log = structlog.get_logger(__name__)

#: Items kept after their verdict, for feedback (packaging changed -> learn their views).
#: Only their colour crops (what the gallery learns from): about 1.5 minutes of items at
#: 3 items/s. Older sidelined items keep their crops in the snapshot store on disk.
RECENT_ITEMS = 256

#: Publishes an event on `…/events`: (kind, body).
PublishEvent = Callable[[str, Mapping[str, object]], object]


class RecentViews:
    """The colour crops of the last decided items, for `packaging_changed` feedback.

    Keeps only what the gallery learns from: the depth, mask and ground truth of a crop are
    two thirds of its memory and no feedback needs them. Oldest items are forgotten first.
    """

    def __init__(self, capacity: int = RECENT_ITEMS) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, tuple[str | None, dict[str, U8Array]]] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, record: ItemRecord) -> None:
        views = {cam: crop.color for cam, crop in record.crops.items()}
        with self._lock:
            self._items[record.item_id] = (record.product_id, views)
            self._items.move_to_end(record.item_id)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, item_id: str) -> tuple[str | None, dict[str, U8Array]] | None:
        """(product ID as decided, colour crop per camera), or None if it was forgotten."""
        with self._lock:
            return self._items.get(item_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def nbytes(self) -> int:
        with self._lock:
            return sum(c.nbytes for _, views in self._items.values() for c in views.values())


class FeedbackLearner:
    """Takes each feedback message: labels its snapshot, and teaches the gallery an item's
    views when the packaging of its product changed."""

    def __init__(self, inspector: ItemInspector, recent: RecentViews,
                 snapshots: SnapshotStore | None, publish_event: PublishEvent) -> None:
        self._inspector = inspector
        self._recent = recent
        self._snapshots = snapshots
        self._publish_event = publish_event
        self._learner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cv-learn")

    def on_feedback(self, feedback: Feedback) -> None:
        log.info("feedback", item_id=feedback.item_id, kind=feedback.kind)
        if self._snapshots is not None:
            self._snapshots.label(feedback.item_id, feedback.kind,
                                  received_ms=feedback.received_ms, note=feedback.note)
        if feedback.kind != "packaging_changed":
            return
        recent = self._recent.get(feedback.item_id)
        product = feedback.product_id or (recent[0] if recent else None)
        if recent is None or product is None:
            self._publish_event("feedback_ignored", {
                "item_id": feedback.item_id, "why": "item not among recent items"})
            return
        self._learner.submit(self._learn, product, feedback.item_id, recent[1])

    def _learn(self, product: str, item_id: str, views: Mapping[str, U8Array]) -> None:
        try:
            self._inspector.learn_reference(product, views)
        except Exception:  # a failed learn costs that feedback only
            log.exception("gallery_learn_failed", product_id=product, item_id=item_id)
            return
        log.info("gallery_learned", product_id=product, item_id=item_id)

    def close(self) -> None:
        """Learn what was already taken in, then stop."""
        self._learner.shutdown(wait=True)
