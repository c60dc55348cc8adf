"""Fusion: one item's model scores -> a fused damage probability, and the operating thresholds.

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
from typing import Any

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
            rows = {c: [float(v) for v in raw["weights"][c]] for c in COMBOS}
            mean, std = float(norm["mean"]), float(norm["std"])
        except (KeyError, TypeError, ValueError) as exc:
            raise FusionError(f"fusion section of the manifest: {exc!r}; expected anomaly_norm "
                              f"{{mean, std}} and weights for {COMBOS}") from None
        if any(len(w) != 4 for w in rows.values()) or std <= 0:
            raise FusionError("fusion weights need 4 numbers each and anomaly_norm.std > 0")
        return Fusion(mean, std, {c: (w[0], w[1], w[2], w[3]) for c, w in rows.items()})

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


