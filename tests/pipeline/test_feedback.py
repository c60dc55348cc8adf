"""Learning from feedback: the gallery is taught a changed packaging, never damage."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import pytest

from edge.commands.models import memory_inspector
from edge.config import DEFAULT_MANIFEST, DecisionConfig, ModelsConfig
from edge.infer.golden import GoldenSet, load_golden
from edge.infer.inspector import ItemInspector
from edge.pipeline.feedback import HELD_NOTE, FeedbackLearner, RecentViews
from edge.types import Feedback, ItemRecord
from edge.verdicts.policy import VerdictPolicy

GOLDEN = DEFAULT_MANIFEST.parent / "golden" / "golden.npz"


@pytest.fixture(scope="module")
def golden() -> GoldenSet:
    return load_golden(GOLDEN)


class _Events:
    """What the learner publishes on `…/events`."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Mapping[str, object]]] = []

    def __call__(self, kind: str, body: Mapping[str, object]) -> None:
        self.sent.append((kind, body))


class _Snapshots:
    """The snapshot store's `label`, as the learner calls it."""

    def __init__(self) -> None:
        self.labels: dict[str, tuple[str, str | None]] = {}

    def label(self, item_id: str, kind: str, *, received_ms: float | None = None,
              note: str | None = None) -> bool:
        self.labels[item_id] = (kind, note)
        return True


def _item(golden: GoldenSet, product: str, label: str) -> ItemRecord:
    return next(r for r, lab in zip(golden.records, golden.labels, strict=True)
                if r.product_id == product and lab == label)


def _fresh(tmp_path: Path) -> ItemInspector:
    return memory_inspector(ModelsConfig(manifest=DEFAULT_MANIFEST, max_batch=8,
                                         gallery_dir=tmp_path / "gallery"), None)


def _learner(inspector: ItemInspector, recent: RecentViews, events: _Events,
             snapshots: _Snapshots | None = None, *, threshold: float,
             geometry: float | None = None, per_hour: int = 20) -> FeedbackLearner:
    return FeedbackLearner(inspector, recent, snapshots, events,  # type: ignore[arg-type]
                           damage_threshold=lambda: threshold,
                           geometry_threshold=lambda: geometry, learn_per_hour=per_hour)


def _decide(inspector: ItemInspector, record: ItemRecord, recent: RecentViews) -> float:
    """Inspect and remember `record` as the node does; its fused score."""
    policy = VerdictPolicy.from_manifest(inspector.manifest, DecisionConfig())
    inference = inspector.infer([record])[0]
    recent.remember(record, policy.decide(record, inference, 0.0))
    return inference.fused


def _changed(item_id: str, product: str | None) -> Feedback:
    return Feedback(item_id, "packaging_changed", product, 0.0)


def test_a_damaged_item_sent_as_packaging_changed_does_not_teach_the_gallery_damage(
        golden: GoldenSet, tmp_path: Path) -> None:
    """A crushed box reported as "packaging changed" is held for review (event, snapshot
    note) and not learned (its dent shows in depth, which new artwork cannot explain): the
    next damaged item of that product scores as before. Learning
    it would have lowered that score, so the hold is what keeps the damage visible."""
    crushed, torn = _item(golden, "P-CRACKS", "crush"), _item(golden, "P-CRACKS", "tear")
    inspector, recent, events, snapshots = _fresh(tmp_path), RecentViews(), _Events(), _Snapshots()
    threshold = inspector.manifest.thresholds["components"]["damage"]
    geometry = inspector.manifest.thresholds["components"]["geometry"]
    _decide(inspector, crushed, recent)
    seen = recent.get(crushed.item_id)
    assert seen is not None
    assert seen.damage is not None
    assert seen.geometry is not None
    # The crush shows in depth (the dent in its top), whatever the classifier made of it.
    assert seen.geometry >= geometry
    before = inspector.infer([torn])[0]
    learner = _learner(inspector, recent, events, snapshots, threshold=threshold,
                       geometry=geometry)
    learner.on_feedback(_changed(crushed.item_id, "P-CRACKS"))
    learner.close()
    after = inspector.infer([torn])[0]
    assert after.anomaly_raw == before.anomaly_raw
    assert after.fused == before.fused
    assert [kind for kind, _ in events.sent] == ["feedback_held"]
    assert "geometry deficit" in str(events.sent[0][1]["why"])
    kind, note = snapshots.labels[crushed.item_id]
    assert kind == "packaging_changed"
    assert note is not None
    assert note.startswith(HELD_NOTE)
    # Without the check the same feedback teaches the gallery the damage.
    taught = _learner(inspector, recent, _Events(), threshold=1.1)
    taught.on_feedback(_changed(crushed.item_id, "P-CRACKS"))
    taught.close()
    learned = inspector.infer([torn])[0]
    assert learned.anomaly_raw is not None
    assert before.anomaly_raw is not None
    assert learned.anomaly_raw < before.anomaly_raw


def test_the_classifiers_own_damage_score_holds_feedback_without_the_geometry_check(
        golden: GoldenSet, tmp_path: Path) -> None:
    """With no geometry limit (models that do not measure the top face), a flap torn off a
    mailer, which the classifier scores high, is still held on its damage score."""
    flap = _item(golden, "P-STAINS", "deconstruction")
    inspector, recent, events = _fresh(tmp_path), RecentViews(), _Events()
    _decide(inspector, flap, recent)
    seen = recent.get(flap.item_id)
    assert seen is not None
    assert seen.damage is not None
    learner = _learner(inspector, recent, events, threshold=seen.damage - 1e-3, geometry=None)
    learner.on_feedback(_changed(flap.item_id, "P-STAINS"))
    learner.close()
    assert [kind for kind, _ in events.sent] == ["feedback_held"]
    assert "damage score" in str(events.sent[0][1]["why"])


def test_an_intact_item_of_the_announced_product_is_learned(
        golden: GoldenSet, tmp_path: Path) -> None:
    """An intact item whose packaging changed is learned: its product's gallery grows."""
    intact = _item(golden, "P-BOX-S", "none")
    inspector, recent, events = _fresh(tmp_path), RecentViews(), _Events()
    threshold = inspector.manifest.thresholds["components"]["damage"]
    _decide(inspector, intact, recent)
    views = {cam: inspector.gallery.views("P-BOX-S", cam) for cam in intact.crops}
    learner = _learner(inspector, recent, events, threshold=threshold)
    learner.on_feedback(_changed(intact.item_id, "P-BOX-S"))
    learner.close()
    assert events.sent == []
    assert all(inspector.gallery.views("P-BOX-S", cam) == views[cam] + 1 for cam in views)


def test_feedback_naming_another_product_or_past_the_hourly_limit_is_held(
        golden: GoldenSet, tmp_path: Path) -> None:
    """Views are held when the feedback names a product other than the one announced, and
    once a product has had its views for the hour."""
    first, second = _item(golden, "P-BOX-S", "none"), _item(golden, "P-POLY", "none")
    inspector, recent, events = _fresh(tmp_path), RecentViews(), _Events()
    threshold = inspector.manifest.thresholds["components"]["damage"]
    for record in (first, second):
        _decide(inspector, record, recent)
    learner = _learner(inspector, recent, events, threshold=threshold, per_hour=1)
    learner.on_feedback(_changed(first.item_id, "P-POLY"))
    learner.on_feedback(_changed(second.item_id, "P-POLY"))  # learned: the hour's one view
    learner.on_feedback(_changed(second.item_id, "P-POLY"))  # the second: held
    learner.close()
    assert [kind for kind, _ in events.sent] == ["feedback_held", "feedback_held"]
    assert "announced as P-BOX-S" in str(events.sent[0][1]["why"])
    assert "in the last hour" in str(events.sent[1][1]["why"])
    assert learner.held == 2


def test_an_unannounced_item_is_never_learned_for_the_product_the_feedback_names(
        golden: GoldenSet, tmp_path: Path) -> None:
    """An item no announcement named (a foreign parcel) is held, whatever product the
    feedback claims: its views would otherwise become that product's pristine references."""
    intact = dataclasses.replace(_item(golden, "P-BOX-S", "none"), product_id=None,
                                 unannounced=True)
    inspector, recent, events = _fresh(tmp_path), RecentViews(), _Events()
    threshold = inspector.manifest.thresholds["components"]["damage"]
    _decide(inspector, intact, recent)
    learner = _learner(inspector, recent, events, threshold=threshold)
    learner.on_feedback(_changed(intact.item_id, "P-BOX-S"))
    learner.close()
    assert [kind for kind, _ in events.sent] == ["feedback_held"]
    assert "not announced" in str(events.sent[0][1]["why"])


def test_an_item_out_of_distribution_is_never_learned(golden: GoldenSet, tmp_path: Path
                                                      ) -> None:
    """Views the models could not judge (not like any parcel they know) are held: the
    gallery would learn whatever the camera saw as the product's pristine look."""
    intact = _item(golden, "P-BOX-S", "none")
    inspector, recent, events = _fresh(tmp_path), RecentViews(), _Events()
    threshold = inspector.manifest.thresholds["components"]["damage"]
    policy = VerdictPolicy.from_manifest(inspector.manifest, DecisionConfig())
    inference = dataclasses.replace(inspector.infer([intact])[0], ood=3.0)
    recent.remember(intact, policy.decide(intact, inference, 0.0))
    views = {cam: inspector.gallery.views("P-BOX-S", cam) for cam in intact.crops}
    learner = _learner(inspector, recent, events, threshold=threshold)
    learner.on_feedback(_changed(intact.item_id, "P-BOX-S"))
    learner.close()
    assert [kind for kind, _ in events.sent] == ["feedback_held"]
    assert "out of distribution" in str(events.sent[0][1]["why"])
    assert all(inspector.gallery.views("P-BOX-S", cam) == views[cam] for cam in views)
