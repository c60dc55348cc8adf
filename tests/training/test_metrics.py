"""The committed models' measured quality (engines/metrics.json) against the targets, and
the real development photographs re-judged by the committed models."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from edge.catalogue import Catalogue
from edge.config import DEFAULT_MANIFEST, DecisionConfig, ModelsConfig
from edge.infer.inspector import ItemInspector
from edge.infer.ood import is_out_of_distribution
from edge.infer.photo import load_photo
from edge.training.cards import TARGETS, lookup, target_status
from edge.verdicts.policy import VerdictPolicy

ENGINES = DEFAULT_MANIFEST.parent
REAL_PHOTOS = ENGINES.parent.parent / "shared" / "real-photos"


@pytest.fixture(scope="module")
def metrics() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((ENGINES / "metrics.json").read_text(encoding="utf-8"))
    return loaded


def test_metrics_carry_the_keys_other_tools_read(metrics: dict[str, Any]) -> None:
    u = metrics["unseen_products"]
    for key in ("recall_at_fpr_0.001", "recall_at_fpr_0.005", "recall_at_fpr_0.01", "auroc"):
        assert 0.0 <= u["fused"][key] <= 1.0, key
    for severity in ("subtle", "moderate", "severe"):
        assert u["by_severity"][severity]["items"] > 0, severity
    for kind in ("crush", "tear", "hole", "spill", "deconstruction", "broken_set"):
        assert u["by_type"][kind]["items"] > 0, kind
    for key in ("confounder_fpr", "broken_set_recall", "calibration_error"):
        assert math.isfinite(u[key]), key
    assert u["products"] >= 90  # a hundred products of the test split, none seen in training


#: The targets the shipped models do not meet yet (the model card has the figures): strict,
#: so a model that meets one fails here until it is taken off this list.
NOT_MET = {
    "moderate + severe damage: fused recall at FPR 0.5 % >= 0.95",
    "subtle damage: fused recall at FPR 0.5 % >= 0.70",
    "confounder FPR on unseen prints <= 1 %",
    "broken-set recall >= 0.9",
}


def test_the_list_of_targets_not_met_names_real_targets() -> None:
    assert {t[0] for t in TARGETS} >= NOT_MET


@pytest.mark.parametrize("name", [
    pytest.param(t[0], marks=pytest.mark.xfail(reason="not met by the shipped models", strict=True))
    if t[0] in NOT_MET else t[0] for t in TARGETS])
def test_the_shipped_models_meet_each_target_on_unseen_products(metrics: dict[str, Any],
                                                                 name: str) -> None:
    status = {n: (v, ok) for n, v, ok in target_status(metrics)}
    value, ok = status[name]
    assert ok, f"{name}: measured {value:.4f}"


def test_real_photographs_in_the_metrics_meet_their_targets(metrics: dict[str, Any]) -> None:
    photos = metrics["real_photos"]
    assert photos["intact_pass"]
    assert photos["scenes_flagged_ood"] == photos["scenes"] > 0


def test_every_damaged_photograph_scores_above_every_intact_one(metrics: dict[str, Any]) -> None:
    assert metrics["real_photos"]["every_damaged_above_every_intact"]


def test_the_models_improve_on_the_ones_they_replaced(metrics: dict[str, Any]) -> None:
    """A retrained model is committed only when its card improves: on the same unseen
    products, measured by the same code."""
    prev = metrics["previous_models"]
    for path in (("unseen_products", "fused", "auroc"),
                 ("unseen_products", "fused", "recall_at_fpr_0.005"),
                 ("unseen_products", "moderate_and_severe", "recall_at_fpr_0.005")):
        assert lookup(metrics, path) > lookup(prev, path), path


def test_the_model_card_states_the_figures_of_metrics_json(metrics: dict[str, Any]) -> None:
    card = (ENGINES / "damage" / "MODEL_CARD.md").read_text(encoding="utf-8")
    subtle = lookup(metrics, ("unseen_products", "by_severity", "subtle", "recall_at_fpr_0.005"))
    assert f"{100 * subtle:.1f}%" in card
    assert metrics["version"] in card


@pytest.mark.skipif(not REAL_PHOTOS.exists(), reason="the development photographs "
                    "(../shared/real-photos) are not on this machine")
def test_the_committed_models_judge_the_real_photographs_as_recorded(
        tmp_path: Path, metrics: dict[str, Any]) -> None:
    """Re-run: every photograph's fused score is the recorded one, the intact box passes,
    scenes are out of distribution and not called damaged."""
    inspector = ItemInspector.load(ModelsConfig(manifest=DEFAULT_MANIFEST,
                                                gallery_dir=tmp_path / "g"), Catalogue(()))
    policy = VerdictPolicy.from_manifest(inspector.manifest, DecisionConfig())
    fused: dict[str, float] = {}
    for name, recorded in metrics["real_photos"]["photos"].items():
        path = next(REAL_PHOTOS.glob(f"*/{name}"))
        photo = load_photo(path, None, product=None, product_id=None, size=inspector.size)
        inf = inspector.infer([photo.record])[0]
        verdict = policy.decide(photo.record, inf, 0.0)
        assert inf.fused == pytest.approx(recorded["fused"], abs=1e-4), name
        fused[name] = inf.fused
        if recorded["label"] == "not_parcel":
            assert is_out_of_distribution(inf.ood), name
            assert "damage" not in [r.value for r in verdict.reasons], name
        if recorded["label"] == "intact":
            assert verdict.decision.value == "pass", name
    assert len(fused) == len(metrics["real_photos"]["photos"]) > 0
