"""The item inspector on the shipped models: known items, fallbacks, learning, batching."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from edge.catalogue import load_catalogue
from edge.config import DecisionConfig, ModelsConfig
from edge.infer.gallery import ReferenceGallery
from edge.infer.golden import GoldenSet
from edge.infer.inspector import ItemInspector
from edge.infer.reload import prepare_reload, switch_to
from edge.types import Decision, ItemRecord, Reason
from edge.verdicts.policy import VerdictPolicy


def _decide(inspector: ItemInspector, records: list[ItemRecord]) -> list[Decision]:
    policy = VerdictPolicy.from_manifest(inspector.manifest, DecisionConfig())
    return [policy.decide(r, x, 0.0).decision for r, x in zip(records, inspector.infer(records),
                                                               strict=True)]


def _by_label(golden: GoldenSet, label: str) -> list[ItemRecord]:
    return [r for r, lab in zip(golden.records, golden.labels, strict=True) if lab == label]


def test_broken_set_is_caught(inspector: ItemInspector, golden: GoldenSet) -> None:
    """Multipacks missing a unit score above every good item; the one whose gap shows down
    to the belt in depth is sidelined at the shipped threshold. (The other, missing a unit
    at its edge, scores just under it: the model card's broken-set recall is 72 %.)"""
    broken = _by_label(golden, "broken_set")
    assert len(broken) == 2
    good = _by_label(golden, "confounder") + _by_label(golden, "none")
    worst_good = max(inf.fused for inf in inspector.infer(good))
    assert all(inf.fused > worst_good for inf in inspector.infer(broken))
    assert Decision.SIDELINE in _decide(inspector, broken)


def test_damage_like_print_is_not_flagged(inspector: ItemInspector, golden: GoldenSet) -> None:
    """Intact items printed with cracks or stains pass; so do plain intact items."""
    good = _by_label(golden, "confounder") + _by_label(golden, "none")
    assert len(good) >= 3
    assert _decide(inspector, good) == [Decision.PASS] * len(good)


def test_every_damaged_golden_item_ranks_above_every_good_one(inspector: ItemInspector,
                                                              golden: GoldenSet) -> None:
    """Crush, hole, spill and the torn-off flap score above every intact item and
    damage-like print; crush, hole and the flap are sidelined at the shipped threshold. (The
    demo world's tear scores under the stains print and the spill under the threshold: the
    model card's per-type recall says how often these models miss them.)"""
    good = _by_label(golden, "confounder") + _by_label(golden, "none")
    worst_good = max(inf.fused for inf in inspector.infer(good))
    for label in ("crush", "hole", "spill", "deconstruction"):
        (rec,) = _by_label(golden, label)
        (inf,) = inspector.infer([rec])
        assert inf.fused > worst_good, label
    for label in ("crush", "hole", "deconstruction"):
        assert _decide(inspector, _by_label(golden, label)) == [Decision.SIDELINE], label


def test_a_depression_in_the_top_face_is_measured_and_sidelined(
        inspector: ItemInspector, golden: GoldenSet) -> None:
    """The shipped manifest turns the top-face check on: a crushed item's dent is measured in
    millimetres and carries the verdict on its own (reason geometry)."""
    (rec,) = _by_label(golden, "crush")
    assert inspector.surface_full_mm is not None
    result = inspector.measure_geometry(rec)
    assert result is not None
    assert result.dent_mm is not None
    assert result.dent_mm > 10.0
    policy = VerdictPolicy.from_manifest(inspector.manifest, DecisionConfig())
    (inf,) = inspector.infer([rec])
    assert Reason.GEOMETRY in policy.decide(rec, inf, 0.0).reasons


def test_without_depth_classifier_runs_on_rgb_and_geometry_is_skipped(
        inspector: ItemInspector, golden: GoldenSet) -> None:
    """Crops without depth still get a damage score; geometry is None; the verdict says so."""
    rec = _by_label(golden, "deconstruction")[0]
    crops = {k: dataclasses.replace(c, height_mm=np.zeros_like(c.height_mm), has_depth=False)
             for k, c in rec.crops.items()}
    blind = dataclasses.replace(rec, crops=crops)
    (inf,) = inspector.infer([blind])
    assert inf.geometry is None
    assert inf.damage > 0.5
    policy = VerdictPolicy.from_manifest(inspector.manifest, DecisionConfig())
    assert Reason.NO_DEPTH in policy.decide(blind, inf, 0.0).reasons


def test_batched_inference_equals_one_by_one(inspector: ItemInspector,
                                             golden: GoldenSet) -> None:
    """Scores do not depend on how items are batched (more items than max_batch)."""
    records = list(golden.records)
    together = inspector.infer(records)
    alone = [inspector.infer([r])[0] for r in records]
    for a, b in zip(together, alone, strict=True):
        assert abs(a.fused - b.fused) < 1e-4
        assert abs(a.damage - b.damage) < 1e-4


def test_unknown_product_falls_back_to_classifier(inspector: ItemInspector,
                                                  golden: GoldenSet) -> None:
    """A product without references: no anomaly score, verdict says NO_GALLERY."""
    rec = dataclasses.replace(golden.records[0], product_id="P-NEW")
    (inf,) = inspector.infer([rec])
    assert inf.anomaly is None
    assert inf.anomaly_map is None
    assert inf.geometry is None
    policy = VerdictPolicy.from_manifest(inspector.manifest, DecisionConfig())
    assert Reason.NO_GALLERY in policy.decide(rec, inf, 0.0).reasons


def test_learn_reference_adds_views_that_persist(models_cfg: ModelsConfig,
                                                 golden: GoldenSet) -> None:
    """'Packaging changed' feedback: the item's views become references, on disk."""
    insp = ItemInspector.load(models_cfg, load_catalogue())
    rec = dataclasses.replace(_by_label(golden, "none")[0], product_id="P-REPACKED")
    assert insp.infer([rec])[0].anomaly is None
    insp.learn_reference("P-REPACKED", {cam: c.color for cam, c in rec.crops.items()})
    after = insp.infer([rec])[0]
    assert after.anomaly is not None
    assert after.anomaly_raw is not None
    assert after.anomaly_raw < 0.05  # its own views match themselves
    files = sorted(p.name for p in (models_cfg.gallery_dir / "P-REPACKED").iterdir())
    assert files == ["angled.npz", "top.npz"]
    again = ItemInspector.load(models_cfg, load_catalogue())
    assert again.gallery.views("P-REPACKED", "top") == 1
    assert again.gallery.has("P-BOX-S")  # seeded from the shipped references on first start


def test_anomaly_map_is_in_crop_coordinates(inspector: ItemInspector, golden: GoldenSet) -> None:
    """The anomaly map has the crop's size and peaks where a broken set misses its unit."""
    rec = _by_label(golden, "broken_set")[0]
    (inf,) = inspector.infer([rec])
    assert inf.anomaly_map is not None
    assert inf.anomaly_camera in rec.crops
    assert inf.anomaly_map.shape == rec.crops[inf.anomaly_camera].mask.shape


def test_intra_op_threads_do_not_change_results(golden: GoldenSet, tmp_path: Path) -> None:
    """The configured intra-op thread count is honoured without changing scores."""
    from edge.commands.models import memory_inspector

    records = list(golden.records)
    scores = []
    for n in (1, 2):
        cfg = ModelsConfig(intra_op_threads=n, gallery_dir=tmp_path / str(n))
        scores.append([inf.fused for inf in memory_inspector(cfg, None).infer(records)])
    assert np.allclose(scores[0], scores[-1], atol=1e-4)


def test_broken_set_finding_points_at_the_gap(inspector: ItemInspector, golden: GoldenSet) -> None:
    """A multipack whose missing unit shows as a gap down to the belt gets a boxed broken_set
    finding; a hole in a multipack, however deep, is not called a broken set."""
    policy = VerdictPolicy.from_manifest(inspector.manifest, DecisionConfig())
    gapped = 0
    for rec in _by_label(golden, "broken_set"):
        measured = inspector.measure_geometry(rec)
        assert measured is not None
        if measured.set_score < 1.0:
            continue  # the gap did not show down to the belt in this item's depth
        gapped += 1
        (inf,) = inspector.infer([rec])
        finding = {f.type.value: f for f in policy.decide(rec, inf, 0.0).findings}
        assert "broken_set" in finding
        assert finding["broken_set"].box_px is not None
    assert gapped >= 1
    other = [r for r, lab in zip(golden.records, golden.labels, strict=True)
             if lab != "broken_set" and str(r.product_id).startswith("P-MULTI")]
    assert "hole" in [golden.labels[golden.records.index(r)] for r in other]
    for inf in inspector.infer(other):
        assert inf.per_type.get("broken_set", 0.0) < 0.5


class _NanOnOneView:
    """The damage model giving NaN for one view of the batch (an engine fault)."""

    def __init__(self, real: object, view: int) -> None:
        self.real = real
        self.view = view

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: v.copy() for k, v in self.real.run(feeds).items()}  # type: ignore[attr-defined]
        out["probs"][self.view] = np.nan
        return out


@pytest.mark.parametrize("view", [0, 1])
def test_a_nan_score_from_either_camera_sidelines_the_item(golden: GoldenSet,
                                                           view: int) -> None:
    """Python's max kept or dropped the NaN depending on the camera's place in the order;
    now a NaN from either camera makes the item's damage score NaN, and it is sidelined."""
    from tests.infer.conftest import DEFAULT_MANIFEST, memory_inspector

    one = _by_label(golden, "none")[0]
    crop = next(iter(one.crops.values()))
    record = dataclasses.replace(one, crops={  # the same good view from two cameras
        "angled": dataclasses.replace(crop, camera_id="angled"),
        "top": dataclasses.replace(crop, camera_id="top")})
    assert _decide(memory_inspector(ModelsConfig(manifest=DEFAULT_MANIFEST), None),
                   [record]) == [Decision.PASS]
    insp = memory_inspector(ModelsConfig(manifest=DEFAULT_MANIFEST, max_batch=8), None)
    insp.damage = _NanOnOneView(insp.damage, view)  # type: ignore[assignment]
    inference = insp.infer([record])[0]
    assert np.isnan(inference.damage)
    assert _decide(insp, [record]) == [Decision.SIDELINE]


def _repacked(golden: GoldenSet) -> ItemRecord:
    return dataclasses.replace(_by_label(golden, "none")[0], product_id="P-REPACKED")


def _learned_repacked(models_cfg: ModelsConfig, golden: GoldenSet) -> ItemInspector:
    insp = ItemInspector.load(models_cfg, load_catalogue())
    rec = _repacked(golden)
    insp.learn_reference("P-REPACKED", {cam: c.color for cam, c in rec.crops.items()})
    return insp


def test_an_updated_embedding_model_re_embeds_the_gallery_at_start(
        models_cfg: ModelsConfig, golden: GoldenSet, other_embedding_manifest: Path) -> None:
    """A model update with features of the same size: the references learned from feedback
    and the shipped ones are re-embedded with the new model from the views their banks
    keep. Scored against the old model's features, an item that matches its own
    references exactly read as a raw anomaly distance of ~1.0."""
    _learned_repacked(models_cfg, golden)
    progress: list[str] = []  # the service extends systemd's start timeout on each
    updated = ItemInspector.load(dataclasses.replace(models_cfg,
                                                     manifest=other_embedding_manifest),
                                 load_catalogue(), on_progress=progress.append)
    assert len(progress) == 18  # the 16 shipped banks and P-REPACKED's two
    assert progress[-1].endswith("bank 18 of 18")
    assert updated.gallery.stale() == {}
    after = updated.infer([_repacked(golden)])[0]
    assert after.anomaly_raw is not None
    assert after.anomaly_raw < 0.05
    assert updated.gallery.views("P-REPACKED", "top") == 1
    assert updated.gallery.has("P-BOX-S", "top")  # the shipped references too


def test_a_reload_to_another_embedding_model_switches_the_gallery_with_it(
        models_cfg: ModelsConfig, golden: GoldenSet, other_embedding_manifest: Path) -> None:
    """SIGHUP with a new embedding model: the gallery is re-embedded beside the running
    one, which goes on scoring with its own model; the files change with the switch."""
    running = _learned_repacked(models_cfg, golden)
    old_model = running.gallery.model
    prepared = prepare_reload(running, other_embedding_manifest)
    assert prepared.gallery is not None
    assert ReferenceGallery(models_cfg.gallery_dir, model=old_model).stale() == {}
    assert running.infer([_repacked(golden)])[0].anomaly_raw < 0.05  # type: ignore[operator]
    # Feedback while the new gallery was being prepared is not lost at the switch.
    rec = _repacked(golden)
    running.learn_reference("P-REPACKED", {cam: c.color for cam, c in rec.crops.items()})
    switch_to(running, prepared)
    assert running.gallery.model == prepared.gallery.model != old_model
    assert running.gallery.views("P-REPACKED", "angled") == 2
    assert running.infer([rec])[0].anomaly_raw < 0.05  # type: ignore[operator]
    assert running.persist_gallery() == 0  # after the switch: inference never waits on it
    on_disk = ReferenceGallery(models_cfg.gallery_dir, model=prepared.gallery.model)
    assert on_disk.stale() == {}
    assert on_disk.views("P-REPACKED", "angled") == 2
    # The old model's features stay on disk beside the new ones: a rollback finds them.
    assert ReferenceGallery(models_cfg.gallery_dir, model=old_model).stale() == {}


def test_the_doctor_loads_the_gallery_without_writing_it(
        models_cfg: ModelsConfig, golden: GoldenSet, other_embedding_manifest: Path) -> None:
    """`edge-node check` with a new model beside a node running the old one: the stale banks
    are re-embedded in memory for its test, the files are left as they are."""
    _learned_repacked(models_cfg, golden)
    assert models_cfg.gallery_dir is not None
    before = {p: p.read_bytes() for p in sorted(models_cfg.gallery_dir.rglob("*"))
              if p.is_file()}
    doctor = ItemInspector.load(dataclasses.replace(models_cfg,
                                                    manifest=other_embedding_manifest),
                                load_catalogue(), read_only=True)
    assert doctor.gallery.stale() == {}
    assert doctor.infer([_repacked(golden)])[0].anomaly_raw < 0.05  # type: ignore[operator]
    after = {p: p.read_bytes() for p in sorted(models_cfg.gallery_dir.rglob("*"))
             if p.is_file()}
    assert after == before


def test_stale_banks_without_views_are_reseeded_or_left_out(models_cfg: ModelsConfig) -> None:
    """Another model's banks that kept no views: a shipped product gets the shipped views
    again; any other product is judged without the gallery until it gets references."""
    assert models_cfg.gallery_dir is not None
    for product in ("P-BOX-S", "P-GONE"):
        (models_cfg.gallery_dir / product).mkdir(parents=True)
        np.savez(models_cfg.gallery_dir / product / "top.npz",
                 rows=np.ones((4, 122), np.float16), product_id=np.str_(product),
                 camera_id=np.str_("top"), views=np.int64(1), model=np.str_("retired@128"))
    insp = ItemInspector.load(models_cfg, load_catalogue())
    assert insp.gallery.stale() == {}
    assert insp.gallery.views("P-BOX-S", "top") == 4  # the shipped views of that camera
    assert not insp.gallery.has("P-GONE")
