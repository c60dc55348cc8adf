"""Pure fusion and decision: model scores of one item -> a `Verdict`.

Fusion is a logistic regression over (damage logit, normalized anomaly,
geometry deficit), fitted on a validation split by `tools/train_models.py`
/ `thresholds fit`; one set of weights per availability of the inputs
("full", "no_gallery", "no_depth", "classifier_only"), because a product
without references or a camera without depth must still be judged. The
operating threshold per combination is a quantile of fused scores on
nominal validation items (the target sideline rate), versioned in the
manifest with the normalization constants.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edge.types import (
    DamageFinding,
    DamageType,
    Decision,
    ItemRecord,
    Reason,
    Scores,
    Verdict,
)

if TYPE_CHECKING:
    from edge.config import DecisionConfig
    from edge.infer.manifest import Manifest
    from edge.infer.models import ItemInference

COMBOS = ("full", "no_gallery", "no_depth", "classifier_only")
_EPS = 1e-6


class FusionError(ValueError):
    """Fusion weights or thresholds in the manifest are missing or malformed."""


def combo_name(has_anomaly: bool, has_geometry: bool) -> str:
    if has_anomaly and has_geometry:
        return "full"
    if has_geometry:
        return "no_gallery"
    if has_anomaly:
        return "no_depth"
    return "classifier_only"


def logit(p: float) -> float:
    q = min(max(p, _EPS), 1.0 - _EPS)
    return math.log(q / (1.0 - q))


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


@dataclass(frozen=True, slots=True)
class Fusion:
    """Normalization constants and logistic-regression weights per input combination."""

    anomaly_mean: float
    anomaly_std: float
    weights: Mapping[str, tuple[float, float, float, float]]  # bias, damage, anomaly, geometry

    @staticmethod
    def from_mapping(raw: Mapping[str, Any]) -> Fusion:
        try:
            norm = raw["anomaly_norm"]
            weights = {c: tuple(float(v) for v in raw["weights"][c]) for c in COMBOS}
            mean, std = float(norm["mean"]), float(norm["std"])
        except (KeyError, TypeError, ValueError) as exc:
            raise FusionError(f"fusion section of the manifest: {exc!r}; expected anomaly_norm "
                              f"{{mean, std}} and weights for {COMBOS}") from None
        if any(len(w) != 4 for w in weights.values()) or std <= 0:
            raise FusionError("fusion weights need 4 numbers each and anomaly_norm.std > 0")
        return Fusion(mean, std, weights)  # type: ignore[arg-type]

    def to_mapping(self) -> dict[str, Any]:
        return {"anomaly_norm": {"mean": self.anomaly_mean, "std": self.anomaly_std},
                "weights": {c: [float(v) for v in w] for c, w in self.weights.items()}}

    def normalize_anomaly(self, raw: float | None) -> float | None:
        return None if raw is None else (raw - self.anomaly_mean) / self.anomaly_std

    def fuse(self, damage: float, anomaly: float | None, geometry: float | None) -> float:
        """Fused damage probability; `anomaly` already normalized."""
        bias, w_d, w_a, w_g = self.weights[combo_name(anomaly is not None, geometry is not None)]
        z = bias + w_d * logit(damage)
        if anomaly is not None:
            z += w_a * anomaly
        if geometry is not None:
            z += w_g * geometry
        return sigmoid(z)


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Operating points, fitted for a target false-positive (sideline) rate."""

    version: str
    target_fpr: float
    fused: Mapping[str, float]  # per combination
    components: Mapping[str, float]  # damage, anomaly, geometry: for naming the reasons

    @staticmethod
    def from_mapping(raw: Mapping[str, Any]) -> Thresholds:
        try:
            fused = {c: float(raw["fused"][c]) for c in COMBOS}
            comps = {k: float(v) for k, v in dict(raw.get("components") or {}).items()}
            return Thresholds(str(raw["version"]), float(raw["target_fpr"]), fused, comps)
        except (KeyError, TypeError, ValueError) as exc:
            raise FusionError(f"thresholds section of the manifest: {exc!r}; expected version, "
                              f"target_fpr and fused thresholds for {COMBOS}") from None


class VerdictPolicy:
    """Turns one item's inference into a verdict; pure (no I/O, no clock)."""

    def __init__(self, thresholds: Thresholds, cfg: DecisionConfig,
                 model_versions: Mapping[str, str]) -> None:
        self.thresholds = thresholds
        self.cfg = cfg
        self.model_versions = dict(model_versions)

    @staticmethod
    def from_manifest(manifest: Manifest, cfg: DecisionConfig) -> VerdictPolicy:
        return VerdictPolicy(Thresholds.from_mapping(manifest.thresholds), cfg,
                             manifest.model_versions())

    def _verdict(self, record: ItemRecord, decision: Decision, reasons: list[Reason],
                 now_ms: float, *, scores: Scores | None = None, fail_safe: bool = False,
                 findings: tuple[DamageFinding, ...] = (),
                 inference: ItemInference | None = None) -> Verdict:
        return Verdict(
            item_id=record.item_id, product_id=record.product_id, decision=decision,
            reasons=tuple(dict.fromkeys(reasons)), scores=scores,
            threshold_version=self.thresholds.version, model_versions=self.model_versions,
            findings=findings, captured_ms=record.captured_ms, decided_ms=now_ms,
            deadline_ms=record.deadline_ms, late=now_ms > record.deadline_ms,
            fail_safe=fail_safe,
            anomaly_map=None if inference is None else inference.anomaly_map,
            anomaly_camera=None if inference is None else inference.anomaly_camera)

    def fail_safe(self, record: ItemRecord, reason: Reason, now_ms: float) -> Verdict:
        """The verdict when the models gave nothing usable (timeout, error, not seen)."""
        decision = Decision(self.cfg.fail_safe)
        return self._verdict(record, decision, [reason], now_ms, fail_safe=True)

    def decide(self, record: ItemRecord, inference: ItemInference | None,
               now_ms: float) -> Verdict:
        if inference is None:
            reason = Reason.NOT_SEEN if not record.crops else Reason.ERROR
            return self.fail_safe(record, reason, now_ms)
        reasons, damaged = self._model_reasons(inference)
        notes: list[Reason] = []
        if not inference.has_gallery:
            notes.append(Reason.NO_GALLERY)
        if record.crops and not any(c.has_depth for c in record.crops.values()):
            notes.append(Reason.NO_DEPTH)  # (without a product, geometry is skipped, not depth)
        if record.views_missing:
            notes.append(Reason.VIEWS_MISSING)
        policy_sideline: list[Reason] = []
        if record.unannounced:
            notes.append(Reason.UNANNOUNCED)
            if self.cfg.unannounced == "sideline":
                policy_sideline.append(Reason.UNANNOUNCED)
        if record.merged:
            notes.append(Reason.MERGED)
            if self.cfg.merged == "sideline":
                policy_sideline.append(Reason.MERGED)
        if record.views_missing and self.cfg.views_missing == "sideline":
            policy_sideline.append(Reason.VIEWS_MISSING)
        sideline = damaged or bool(policy_sideline)
        decision = Decision.SIDELINE if sideline else Decision.PASS
        return self._verdict(record, decision, [*reasons, *policy_sideline, *notes], now_ms,
                             scores=inference.scores(), findings=self._findings(inference),
                             inference=inference)

    def _model_reasons(self, inf: ItemInference) -> tuple[list[Reason], bool]:
        threshold = self.thresholds.fused[inf.combo]
        if inf.fused < threshold:
            return [], False
        comps = self.thresholds.components
        reasons = []
        if inf.damage >= comps.get("damage", 1.0):
            reasons.append(Reason.DAMAGE)
        if inf.anomaly is not None and inf.anomaly >= comps.get("anomaly", math.inf):
            reasons.append(Reason.ANOMALY)
        if inf.geometry is not None and inf.geometry >= comps.get("geometry", math.inf):
            reasons.append(Reason.GEOMETRY)
        return (reasons or [_nearest_own_threshold(inf, comps)]), True

    def _findings(self, inf: ItemInference) -> tuple[DamageFinding, ...]:
        out = []
        for name, p in sorted(inf.per_type.items(), key=lambda kv: -kv[1]):
            if p >= self.cfg.finding_min_probability:
                out.append(DamageFinding(DamageType(name), p, inf.boxes.get(name)))
        return tuple(out)


def _nearest_own_threshold(inf: ItemInference, comps: Mapping[str, float]) -> Reason:
    """Only the combination crossed its threshold: the reason is the input that came nearest
    its own threshold (as a share of it), so that a sideline driven by geometry or the
    gallery does not read as damage."""
    shares = [(inf.damage / comps["damage"], Reason.DAMAGE)] if comps.get("damage", 0) > 0 else []
    if inf.anomaly is not None and comps.get("anomaly", 0) > 0:
        shares.append((inf.anomaly / comps["anomaly"], Reason.ANOMALY))
    if inf.geometry is not None and comps.get("geometry", 0) > 0:
        shares.append((inf.geometry / comps["geometry"], Reason.GEOMETRY))
    finite = [s for s in shares if math.isfinite(s[0])]
    return max(finite, key=lambda s: s[0])[1] if finite else Reason.DAMAGE
