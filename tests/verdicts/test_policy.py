"""The verdict policy: fused score vs threshold, reasons, and the policy for special items."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.config import DecisionConfig
from edge.infer.fusion import COMBOS, Fusion, FusionError, Thresholds, combo_name
from edge.infer.inspector import ItemInference
from edge.types import Decision, ItemCrop, ItemRecord, Reason
from edge.verdicts.policy import VerdictPolicy

THRESHOLDS = Thresholds("t-1", 0.005, dict.fromkeys(COMBOS, 0.5),
                        {"damage": 0.8, "anomaly": 3.0, "geometry": 0.2})


def _record(**kw: object) -> ItemRecord:
    crop = ItemCrop("top", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.float32),
                    np.ones((8, 8), bool))
    base: dict[str, object] = {
        "track_id": 1, "item_id": "I1", "product_id": "P-BOX-S", "first_seen_ms": 0.0,
        "captured_ms": 10.0, "deadline_ms": 1000.0, "box_mm": (200.0, 150.0, 100.0),
        "centre_mm": (0.0, 0.0), "crops": {"top": crop}}
    base.update(kw)
    return ItemRecord(**base)  # type: ignore[arg-type]


def _inf(fused: float, damage: float = 0.1, anomaly: float | None = 0.0,
         geometry: float | None = 0.0, per_type: dict[str, float] | None = None) -> ItemInference:
    return ItemInference(damage, per_type or {"crush": 0.01}, anomaly, anomaly, None, None,
                         geometry, fused, {"crush": (1, 2, 3, 4)}, ("top",))


def _policy(**cfg: object) -> VerdictPolicy:
    return VerdictPolicy(THRESHOLDS, DecisionConfig(**cfg), {"damage": "1"})  # type: ignore[arg-type]


def test_score_below_threshold_passes_with_no_reasons() -> None:
    """A nominal announced item with all inputs passes, versions and times recorded."""
    v = _policy().decide(_record(), _inf(0.2), now_ms=50.0)
    assert v.decision is Decision.PASS
    assert v.reasons == ()
    assert v.threshold_version == "t-1"
    assert v.model_versions == {"damage": "1"}
    assert (v.captured_ms, v.decided_ms, v.late, v.fail_safe) == (10.0, 50.0, False, False)


def test_threshold_is_inclusive_and_reasons_name_the_components() -> None:
    """fused == threshold sidelines; each component over its own threshold is named."""
    v = _policy().decide(_record(), _inf(0.5, damage=0.9, anomaly=4.0, geometry=0.05), 0.0)
    assert v.decision is Decision.SIDELINE
    assert v.reasons == (Reason.DAMAGE, Reason.ANOMALY)


def test_fused_over_threshold_without_a_single_component_names_the_nearest_one() -> None:
    """Only the combination is over its threshold: the reason is the input nearest its own
    threshold (damage 0.3 of 0.8, anomaly 1.0 of 3.0: damage; damage 0.1 of 0.8, geometry
    0.15 of 0.2: geometry). It used to be DAMAGE whatever drove the decision."""
    v = _policy().decide(_record(), _inf(0.7, damage=0.3, anomaly=1.0, geometry=0.0), 0.0)
    assert (v.decision, v.reasons) == (Decision.SIDELINE, (Reason.DAMAGE,))
    v = _policy().decide(_record(), _inf(0.7, damage=0.1, anomaly=None, geometry=0.15), 0.0)
    assert v.decision is Decision.SIDELINE
    assert v.reasons[0] is Reason.GEOMETRY
    v = _policy().decide(_record(), _inf(0.7, damage=0.1, anomaly=2.5, geometry=None), 0.0)
    assert v.reasons[0] is Reason.ANOMALY


def test_geometry_reason() -> None:
    """A height/volume deficit over its threshold is reported as GEOMETRY."""
    v = _policy().decide(_record(), _inf(0.9, damage=0.1, anomaly=0.0, geometry=0.4), 0.0)
    assert v.reasons == (Reason.GEOMETRY,)


def test_no_gallery_and_no_depth_are_reported_and_use_their_threshold() -> None:
    """Missing inputs are noted on the verdict and the matching combo threshold applies."""
    th = Thresholds("t", 0.005, {"full": 0.5, "no_gallery": 0.5, "no_depth": 0.5,
                                 "classifier_only": 0.95}, {})
    policy = VerdictPolicy(th, DecisionConfig(), {})
    blind = ItemCrop("top", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.float32),
                     np.ones((8, 8), bool), has_depth=False)
    v = policy.decide(_record(crops={"top": blind}), _inf(0.9, anomaly=None, geometry=None), 0.0)
    assert v.decision is Decision.PASS
    assert set(v.reasons) == {Reason.NO_GALLERY, Reason.NO_DEPTH}
    # An unknown product has no geometry check either, but its depth is fine: no NO_DEPTH.
    v = policy.decide(_record(product_id=None), _inf(0.9, anomaly=None, geometry=None), 0.0)
    assert set(v.reasons) == {Reason.NO_GALLERY}


def test_unannounced_and_merged_follow_the_config() -> None:
    """Unannounced / merged items are sidelined by default and passed when configured."""
    rec = _record(unannounced=True, product_id=None)
    assert _policy().decide(rec, _inf(0.1), 0.0).decision is Decision.SIDELINE
    v = _policy(unannounced="pass").decide(rec, _inf(0.1), 0.0)
    assert v.decision is Decision.PASS
    assert Reason.UNANNOUNCED in v.reasons
    merged = _record(merged=True)
    assert _policy().decide(merged, _inf(0.1), 0.0).reasons[0] is Reason.MERGED
    assert _policy(merged="pass").decide(merged, _inf(0.1), 0.0).decision is Decision.PASS
    assert _policy(merged="pass").decide(merged, _inf(0.9, 0.9), 0.0).decision is \
        Decision.SIDELINE


def test_views_missing_judges_by_default_or_sidelines() -> None:
    """A missing camera is noted; with views_missing=sideline the item is sidelined."""
    rec = _record(views_missing=("angled",))
    v = _policy().decide(rec, _inf(0.1), 0.0)
    assert v.decision is Decision.PASS
    assert Reason.VIEWS_MISSING in v.reasons
    assert _policy(views_missing="sideline").decide(rec, _inf(0.1), 0.0).decision is \
        Decision.SIDELINE


def test_no_inference_is_fail_safe() -> None:
    """Without inference the fail-safe decision applies: NOT_SEEN without crops, else ERROR."""
    v = _policy().decide(_record(crops={}), None, 2000.0)
    assert (v.decision, v.reasons, v.fail_safe, v.late) == (
        Decision.SIDELINE, (Reason.NOT_SEEN,), True, True)
    v = _policy(fail_safe="pass").decide(_record(), None, 0.0)
    assert (v.decision, v.reasons) == (Decision.PASS, (Reason.ERROR,))


def test_findings_above_probability_with_boxes() -> None:
    """Per-type probabilities over finding_min_probability become findings with boxes."""
    v = _policy().decide(_record(), _inf(0.9, per_type={"crush": 0.8, "tear": 0.2}), 0.0)
    assert [(f.type.value, f.box_px) for f in v.findings] == [("crush", (1, 2, 3, 4))]


def test_fusion_mapping_errors_name_what_is_expected() -> None:
    """A manifest without fusion weights raises FusionError listing the combos."""
    with pytest.raises(FusionError, match="no_gallery"):
        Fusion.from_mapping({"anomaly_norm": {"mean": 0, "std": 1}, "weights": {}})
    with pytest.raises(FusionError, match="target_fpr"):
        Thresholds.from_mapping({"version": "x"})


@given(st.floats(0.0, 1.0), st.one_of(st.none(), st.floats(-10, 10)),
       st.one_of(st.none(), st.floats(0, 2)))
def test_fusion_is_a_probability_and_monotone_in_damage(d: float, a: float | None,
                                                        g: float | None) -> None:
    """Fused scores are in [0, 1] and never fall when the classifier probability rises."""
    f = Fusion(0.0, 1.0, dict.fromkeys(COMBOS, (-1.0, 1.2, 0.5, 3.0)))
    lo, hi = f.fuse(d, a, g), f.fuse(min(1.0, d + 0.1), a, g)
    assert 0.0 <= lo <= 1.0
    assert not math.isnan(lo)
    assert hi >= lo
    assert Fusion.from_mapping(f.to_mapping()) == f
    assert combo_name(a is not None, g is not None) in COMBOS


def _ood(fused: float, ood: float | None, damage: float = 0.95) -> ItemInference:
    return dataclasses.replace(_inf(fused, damage=damage, per_type={"crush": 0.97}), ood=ood)


def test_out_of_distribution_is_sidelined_for_review_without_a_damage_reason() -> None:
    """A confident damage score on something unlike any known parcel is not a damage verdict:
    the reason is out_of_distribution, no damage findings, and the item is sidelined."""
    v = _policy().decide(_record(), _ood(0.99, ood=2.5), 0.0)
    assert v.decision is Decision.SIDELINE
    assert Reason.OUT_OF_DISTRIBUTION in v.reasons
    assert Reason.DAMAGE not in v.reasons
    assert v.findings == ()
    assert v.scores is not None
    assert v.scores.ood == 2.5


def test_out_of_distribution_decision_follows_the_config() -> None:
    """pass: let it through, still named; judge: the models decide as usual."""
    passed = _policy(out_of_distribution="pass").decide(_record(), _ood(0.99, ood=1.0), 0.0)
    assert passed.decision is Decision.PASS
    assert passed.reasons[0] is Reason.OUT_OF_DISTRIBUTION
    judged = _policy(out_of_distribution="judge").decide(_record(), _ood(0.99, ood=3.0), 0.0)
    assert judged.decision is Decision.SIDELINE
    assert Reason.DAMAGE in judged.reasons
    assert Reason.OUT_OF_DISTRIBUTION not in judged.reasons


@pytest.mark.parametrize("ood", [None, 0.0, 0.999])
def test_in_distribution_items_are_judged_on_their_scores(ood: float | None) -> None:
    assert _policy().decide(_record(), _ood(0.2, ood=ood, damage=0.1), 0.0).reasons == ()
    assert Reason.DAMAGE in _policy().decide(_record(), _ood(0.9, ood=ood), 0.0).reasons


@pytest.mark.parametrize("mode", ["sideline", "pass", "judge"])
def test_an_unreadable_ood_score_is_an_error_that_never_passes(mode: str) -> None:
    v = _policy(out_of_distribution=mode).decide(_record(), _ood(0.1, ood=math.nan,
                                                                damage=0.1), 0.0)
    assert v.decision is Decision.SIDELINE
    assert Reason.ERROR in v.reasons
    assert Reason.OUT_OF_DISTRIBUTION not in v.reasons


def test_geometry_still_sidelines_an_out_of_distribution_item_that_is_passed() -> None:
    """Depth evidence does not come from the image models: it still counts."""
    inf = dataclasses.replace(_inf(0.99, damage=0.95, geometry=0.9), ood=1.5)
    v = _policy(out_of_distribution="pass").decide(_record(), inf, 0.0)
    assert v.decision is Decision.SIDELINE
    assert v.reasons[:2] == (Reason.OUT_OF_DISTRIBUTION, Reason.GEOMETRY)
    assert Reason.DAMAGE not in v.reasons
