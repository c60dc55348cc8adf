"""Learning from the controller's feedback: labels for the audit trail, and a changed
packaging's look taught to the reference gallery.

The gallery is what the anomaly model calls pristine, so it must not be taught damage: a
`packaging_changed` item's views are learned only when the item's own damage score was under
the damage threshold and, for models that measure the top face, its geometry deficit (a dent
or a hole in its top, which no new artwork explains) under the geometry threshold, its
product is the one announced, and its product has not had more than `gallery_learn_per_hour`
views learned in the last hour. Otherwise they are held for
review: an event on `…/events` and a note on the item's snapshot (`edge-node snapshots
list --held`), never learned.

Feedback arrives on the MQTT client's network thread, which also hands over PUBACKs: the
embedding and the bank file written for a `packaging_changed` run on a thread of their own.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import structlog

from edge.audit.store import SnapshotStore
from edge.infer.inspector import ItemInspector
from edge.infer.ood import is_out_of_distribution
from edge.types import Feedback, ItemRecord, U8Array, Verdict

log = structlog.get_logger(__name__)

#: Items kept after their verdict, for feedback (packaging changed -> learn their views).
#: Only their colour crops (what the gallery learns from): about 1.5 minutes of items at
#: 3 items/s. Older sidelined items keep their crops in the snapshot store on disk.
RECENT_ITEMS = 256

#: Publishes an event on `…/events`: (kind, body).
PublishEvent = Callable[[str, Mapping[str, object]], object]
#: What a snapshot's feedback note starts with when its views were held for review.
HELD_NOTE = "held for review: "
#: Told of each item's views once the gallery learned them: (product ID, crop per camera).
OnLearned = Callable[[str, Mapping[str, U8Array]], None]


@dataclass(frozen=True, slots=True)
class RecentItem:
    """What feedback may need of a decided item: its views and how the models judged it."""

    product_id: str | None
    views: dict[str, U8Array]  # colour crop per camera
    damage: float | None  # the classifier's score; None: not scored (fail-safe)
    ood: float | None = None  # out-of-distribution score (edge/infer/ood.py)
    geometry: float | None = None  # the geometry check's deficit; None: no depth or product


class RecentViews:
    """The colour crops of the last decided items, for `packaging_changed` feedback.

    Keeps only what the gallery learns from: the depth, mask and ground truth of a crop are
    two thirds of its memory and no feedback needs them. Oldest items are forgotten first.
    """

    def __init__(self, capacity: int = RECENT_ITEMS) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, RecentItem] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, record: ItemRecord, verdict: Verdict) -> None:
        views = {cam: crop.color for cam, crop in record.crops.items()}
        scores = verdict.scores
        with self._lock:
            self._items[record.item_id] = RecentItem(
                record.product_id, views, None if scores is None else scores.damage,
                None if scores is None else scores.ood,
                None if scores is None else scores.geometry)
            self._items.move_to_end(record.item_id)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, item_id: str) -> RecentItem | None:
        """The item as decided, or None if it was forgotten."""
        with self._lock:
            return self._items.get(item_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def nbytes(self) -> int:
        with self._lock:
            return sum(c.nbytes for item in self._items.values() for c in item.views.values())


class FeedbackLearner:
    """Takes each feedback message: labels its snapshot, and teaches the gallery an item's
    views when the packaging of its product changed and the item passes the checks above."""

    def __init__(self, inspector: ItemInspector, recent: RecentViews,
                 snapshots: SnapshotStore | None, publish_event: PublishEvent, *,
                 damage_threshold: Callable[[], float], learn_per_hour: int,
                 geometry_threshold: Callable[[], float | None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic,
                 on_learned: OnLearned | None = None) -> None:
        self._inspector = inspector
        self._recent = recent
        self._snapshots = snapshots
        self._publish_event = publish_event
        self._damage_threshold = damage_threshold
        self._geometry_threshold = geometry_threshold
        self._learn_per_hour = learn_per_hour
        self._clock = clock
        self._learned: dict[str, deque[float]] = {}  # product -> when views were learned
        self._lock = threading.Lock()
        self.held = 0
        self._learner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cv-learn")
        #: told of what was learned, on the learning thread (the site's shared gallery; set by
        #: the composition root before the node starts)
        self.on_learned = on_learned

    def damage_threshold(self) -> float:
        """The damage threshold in use, under which an item's views may be learned."""
        return self._damage_threshold()

    def on_feedback(self, feedback: Feedback) -> None:
        log.info("feedback", item_id=feedback.item_id, kind=feedback.kind)
        note = feedback.note
        if feedback.kind == "packaging_changed":
            held = self._packaging_changed(feedback)
            if held is not None:
                note = HELD_NOTE + held + (f" ({note})" if note else "")
        if self._snapshots is not None:
            self._snapshots.label(feedback.item_id, feedback.kind,
                                  received_ms=feedback.received_ms, note=note)

    def _packaging_changed(self, feedback: Feedback) -> str | None:
        """Learn the item's views (off this thread), or say why they are held."""
        recent = self._recent.get(feedback.item_id)
        if recent is None:
            self._publish_event("feedback_ignored", {
                "item_id": feedback.item_id, "why": "item not among recent items"})
            return None
        product = feedback.product_id or recent.product_id
        why = self._why_held(feedback, recent, product)
        if why is not None or product is None:
            why = why or "the item has no product to learn it for"
            with self._lock:
                self.held += 1
            log.warning("gallery_learning_held", item_id=feedback.item_id, product_id=product,
                        why=why)
            self._publish_event("feedback_held", {
                "item_id": feedback.item_id, "product_id": product, "why": why})
            return why
        self._learner.submit(self._learn, product, feedback.item_id, recent.views)
        return None

    def _why_held(self, feedback: Feedback, recent: RecentItem, product: str | None
                  ) -> str | None:
        if recent.product_id is None:
            return "the item was not announced: its product is not known"
        if feedback.product_id is not None and feedback.product_id != recent.product_id:
            return (f"feedback names product {feedback.product_id}, the item was announced "
                    f"as {recent.product_id}")
        threshold = self._damage_threshold()
        if recent.damage is None:
            return "the models did not score the item (fail-safe verdict)"
        if recent.damage >= threshold:
            return (f"the item's own damage score {recent.damage:.3f} is at or above the "
                    f"damage threshold {threshold:.3f}")
        geometry_limit = self._geometry_threshold()
        if recent.geometry is not None and geometry_limit is not None \
                and recent.geometry >= geometry_limit:
            return (f"the item's geometry deficit {recent.geometry:.3f} (a dent or a hole in its "
                    f"top, or a shape unlike its product's) is at or above the geometry "
                    f"threshold {geometry_limit:.3f}")
        if is_out_of_distribution(recent.ood):
            return (f"the item is out of distribution (score {recent.ood}): its views are not "
                    "like the parcels the models know")
        if product is not None and not self._take_learning_slot(product):
            return (f"{self._learn_per_hour} views of product {product} were already learned "
                    "in the last hour")
        return None

    def _take_learning_slot(self, product: str) -> bool:
        now = self._clock()
        with self._lock:
            times = self._learned.setdefault(product, deque())
            while times and now - times[0] > 3600.0:
                times.popleft()
            if len(times) >= self._learn_per_hour:
                return False
            times.append(now)
            return True

    def _learn(self, product: str, item_id: str, views: Mapping[str, U8Array]) -> None:
        try:
            self._inspector.learn_reference(product, views)
        except Exception:  # a failed learn costs that feedback only
            log.exception("gallery_learn_failed", product_id=product, item_id=item_id)
            return
        log.info("gallery_learned", product_id=product, item_id=item_id)
        if self.on_learned is not None:
            try:
                self.on_learned(product, views)
            except Exception:  # the gallery learned it: only the telling failed
                log.exception("gallery_learned_hook_failed", product_id=product, item_id=item_id)

    def close(self) -> None:
        """Learn what was already taken in, then stop."""
        self._learner.shutdown(wait=True)
