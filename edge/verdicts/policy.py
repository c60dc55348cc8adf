"""The verdict policy: one item's inference -> a `Verdict` (pass or sideline, with reasons).

Pure: no I/O, no clock. The fused score and its thresholds come from `edge.infer.fusion`;
this module names the reasons, applies the configured decisions for items the models cannot
judge, and lists the damage findings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from edge.config import DecisionConfig
from edge.infer.fusion import Thresholds
from edge.infer.inspector import ItemInference
from edge.infer.manifest import Manifest
from edge.infer.ood import is_out_of_distribution, is_unreadable
from edge.types import (
    DamageFinding,
    DamageType,
    Decision,
    ItemRecord,
    Reason,
    Scores,
    Verdict,
)


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
        findings = self._findings(inference)
        policy_sideline: list[Reason] = []
        if is_unreadable(inference.ood):
            policy_sideline.append(Reason.ERROR)  # a model fault: never passes, whatever else
        elif is_out_of_distribution(inference.ood) and self.cfg.out_of_distribution != "judge":
            # The image models' scores of an input unlike every known parcel mean nothing: no
            # damage reason, no findings; the configured decision for items the models cannot
            # judge. Geometry comes from depth, not from those models: it still counts.
            geometry = Reason.GEOMETRY in reasons
            reasons, findings = [Reason.OUT_OF_DISTRIBUTION], ()
            damaged = geometry
            if geometry:
                reasons.append(Reason.GEOMETRY)
            if self.cfg.out_of_distribution == "sideline":
                policy_sideline.append(Reason.OUT_OF_DISTRIBUTION)
        notes: list[Reason] = []
        if not inference.has_gallery:
            notes.append(Reason.NO_GALLERY)
        if record.crops and not any(c.has_depth for c in record.crops.values()):
            notes.append(Reason.NO_DEPTH)  # (without a product, geometry is skipped, not depth)
        if record.views_missing:
            notes.append(Reason.VIEWS_MISSING)
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
                             scores=inference.scores(), findings=findings,
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
