"""Fitting fusion weights and operating thresholds from scored validation items (numpy only).

Thresholds are quantiles of scores on nominal (undamaged) items for a
target false-positive (sideline) rate, not F1 optima: damage is rare on a
real line, and the rate of good items sent to the sideline is what the
operator budgets.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edge.infer.fusion import COMBOS, Fusion, Thresholds, logit
from edge.infer.inspector import ItemInference
from edge.types import ItemRecord

Vector = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class ScoreTable:
    """Per item: classifier damage probability, raw anomaly, geometry, and the truth."""

    damage: Vector
    anomaly_raw: Vector  # NaN: no gallery
    geometry: Vector  # NaN: no depth / no product
    damaged: npt.NDArray[np.bool_]
    damage_type: tuple[str | None, ...]
    confounder: npt.NDArray[np.bool_]
    ood: Vector | None = None  # NaN: models without out-of-distribution outputs
    severity: tuple[str | None, ...] = ()  # synthetic truth: subtle, moderate, severe

    @staticmethod
    def collect(records: Sequence[ItemRecord], results: Sequence[ItemInference]) -> ScoreTable:
        def nan(v: float | None) -> float:
            return float("nan") if v is None else v

        types = tuple(None if r.truth is None or r.truth.damage is None else r.truth.damage.value
                      for r in records)
        return ScoreTable(
            damage=np.array([x.damage for x in results]),
            anomaly_raw=np.array([nan(x.anomaly_raw) for x in results]),
            geometry=np.array([nan(x.geometry) for x in results]),
            damaged=np.array([t is not None for t in types]),
            damage_type=types,
            confounder=np.array([bool(r.truth and r.truth.confounder) for r in records]),
            ood=np.array([nan(x.ood) for x in results]),
            severity=tuple(None if r.truth is None else getattr(r.truth, "severity", None)
                           for r in records),
        )


def _design(table: ScoreTable, fusion_norm: tuple[float, float], combo: str) -> Vector:
    mean, std = fusion_norm
    cols = [np.array([logit(float(p)) for p in table.damage])]
    anomaly = np.nan_to_num((table.anomaly_raw - mean) / std, nan=0.0)
    geometry = np.nan_to_num(table.geometry, nan=0.0)
    cols.append(anomaly if combo in ("full", "no_depth") else np.zeros_like(anomaly))
    cols.append(geometry if combo in ("full", "no_gallery") else np.zeros_like(geometry))
    return np.stack(cols, axis=1)


def logistic_regression(x: Vector, y: npt.NDArray[np.bool_], l2: float = 1e-2,
                        iters: int = 50) -> Vector:
    """Newton-Raphson (IRLS) with a small ridge; returns (bias, w1, ..., wd)."""
    a = np.hstack([np.ones((len(x), 1)), x])
    w = np.zeros(a.shape[1])
    t = y.astype(np.float64)
    ridge = l2 * np.eye(a.shape[1])
    ridge[0, 0] = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(a @ w, -30, 30)))
        grad = a.T @ (p - t) + ridge @ w
        hess = (a * (p * (1 - p))[:, None]).T @ a + ridge + 1e-9 * np.eye(a.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if float(np.abs(step).max()) < 1e-8:
            break
    return w


def fit_fusion(table: ScoreTable) -> Fusion:
    """Normalize anomaly by nominal items' scores; one regression per input combination."""
    nominal = ~table.damaged & np.isfinite(table.anomaly_raw)
    ref = table.anomaly_raw[nominal] if nominal.any() else np.array([0.0, 1.0])
    mean, std = float(np.mean(ref)), float(max(np.std(ref), 1e-6))
    weights = {}
    for combo in COMBOS:
        w = logistic_regression(_design(table, (mean, std), combo), table.damaged)
        weights[combo] = (float(w[0]), float(w[1]), float(w[2]), float(w[3]))
    return Fusion(mean, std, weights)


def fused_scores(table: ScoreTable, fusion: Fusion, combo: str) -> Vector:
    """Fused probabilities as if only the inputs of `combo` were available."""
    use_a = combo in ("full", "no_depth")
    use_g = combo in ("full", "no_gallery")
    out = []
    for d, a, g in zip(table.damage, table.anomaly_raw, table.geometry, strict=True):
        an = fusion.normalize_anomaly(float(a)) if use_a and np.isfinite(a) else None
        ge = float(g) if use_g and np.isfinite(g) else None
        if use_a and an is None:
            an = 0.0
        if use_g and ge is None:
            ge = 0.0
        out.append(fusion.fuse(float(d), an, ge))
    return np.array(out)


def nominal_quantile(scores: Vector, damaged: npt.NDArray[np.bool_], target_fpr: float) -> float:
    """Smallest threshold that sidelines at most `target_fpr` of nominal items (score >= t)."""
    nominal = np.sort(scores[~damaged])
    if nominal.size == 0:
        raise ValueError("no nominal (undamaged) items to fit a threshold on")
    allowed = int(np.floor(target_fpr * nominal.size))
    # Sidelined iff score >= t: put t just above the (allowed+1)-th highest nominal score.
    return float(np.nextafter(nominal[nominal.size - 1 - allowed], np.inf))


def fit_thresholds(table: ScoreTable, fusion: Fusion, target_fpr: float,
                   version: str | None = None) -> Thresholds:
    fused = {c: nominal_quantile(fused_scores(table, fusion, c), table.damaged, target_fpr)
             for c in COMBOS}
    comps = {"damage": nominal_quantile(table.damage, table.damaged, target_fpr)}
    anomaly = (table.anomaly_raw - fusion.anomaly_mean) / fusion.anomaly_std
    if np.isfinite(anomaly).any():
        ok = np.isfinite(anomaly)
        comps["anomaly"] = nominal_quantile(anomaly[ok], table.damaged[ok], target_fpr)
    if np.isfinite(table.geometry).any():
        ok = np.isfinite(table.geometry)
        comps["geometry"] = nominal_quantile(table.geometry[ok], table.damaged[ok], target_fpr)
    stamp = version or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return Thresholds(f"fpr{target_fpr:g}-{stamp}", target_fpr, fused, comps)


def thresholds_to_mapping(t: Thresholds, fitted_on: str, items: int) -> dict[str, object]:
    return {"version": t.version, "target_fpr": t.target_fpr,
            "fused": {k: float(v) for k, v in t.fused.items()},
            "components": {k: float(v) for k, v in t.components.items()},
            "fitted_on": fitted_on, "fitted_items": items}


def roc_auc(scores: Vector, positive: npt.NDArray[np.bool_]) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def recall_at_fpr(scores: Vector, positive: npt.NDArray[np.bool_], fpr: float) -> float:
    t = nominal_quantile(scores, positive, fpr)
    return float((scores[positive] >= t).mean()) if positive.any() else float("nan")
