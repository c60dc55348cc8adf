"""Measuring trained models: the unseen-products test, the out-of-distribution rule, the
gallery with few references, and real photographs.

Every figure here is computed through the node's own `ItemInspector` (ONNX Runtime) and
verdict policy, on items the fitting never saw.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.config import DecisionConfig
from edge.infer.dataset import Dataset
from edge.infer.fit import ScoreTable, fused_scores, nominal_quantile, recall_at_fpr, roc_auc
from edge.infer.fusion import Fusion, Thresholds
from edge.infer.gallery import ReferenceGallery
from edge.infer.inspector import ItemInspector, embedding_identity
from edge.infer.ood import is_out_of_distribution
from edge.infer.photo import load_photo
from edge.types import ItemRecord
from edge.verdicts.policy import VerdictPolicy

FPRS = (0.001, 0.005, 0.01)
#: The semantic limit of the parcel prior: packaging classes hold under 5 % of the ImageNet
#: head's belief. Chosen by meaning, not fitted to any photograph.
PARCEL_MIN_LOGPROB = math.log(0.05)
#: Share of in-distribution validation items the novelty limit may flag.
OOD_TARGET_RATE = 0.001
#: Reference views per camera learned for each evaluated product (val and test).
EVAL_REFERENCES = 3


def score(inspector: ItemInspector, records: Sequence[ItemRecord]) -> ScoreTable:
    return ScoreTable.collect(records, inspector.infer(records))


def enroll(inspector: ItemInspector, dataset: Dataset, per_camera: int) -> int:
    """Learn the first `per_camera` reference views of every product of `dataset` into a
    fresh gallery (what a site does when a new product arrives); returns views learned."""
    tmp = Path(tempfile.mkdtemp(prefix="cv-gallery-"))
    inspector.gallery = ReferenceGallery(tmp, model=embedding_identity(inspector.manifest))
    n = 0
    for pid, by_cam in sorted(dataset.references.items()):
        for cam, crops in sorted(by_cam.items()):
            views = [c.color for c in crops[:per_camera]]
            if views:
                inspector.learn_views(pid, cam, views)
                n += len(views)
    return n


def view_signals(inspector: ItemInspector, records: Sequence[ItemRecord]
                 ) -> list[list[tuple[float, float]]]:
    """(parcel log-probability, novelty) of every view of every record."""
    out = []
    for r in records:
        colors = [c.color for _, c in sorted(r.crops.items())]
        emb = inspector.embed_outputs(colors)
        out.append([(float(p[0]), float(n[0]))
                    for p, n in zip(emb["parcel"], emb["novelty"], strict=True)])
    return out


def fit_ood(signals: Sequence[Sequence[tuple[float, float]]]) -> dict[str, float]:
    """The novelty limit that flags at most OOD_TARGET_RATE of the (in-distribution)
    validation items, given the fixed parcel-prior limit."""
    # An item is flagged iff every view is not parcel-like and its least novel such view
    # is beyond the limit; an item with a parcel-like view is never flagged (-inf).
    closest = np.array([min((n for p, n in views if p <= PARCEL_MIN_LOGPROB), default=-math.inf)
                        if all(p <= PARCEL_MIN_LOGPROB for p, _ in views) else -math.inf
                        for views in signals])
    allowed = math.floor(OOD_TARGET_RATE * len(closest))
    ranked = np.sort(closest)[::-1]
    everything = [n for views in signals for _, n in views]
    if len(ranked) > allowed and np.isfinite(ranked[allowed]):
        limit = float(np.nextafter(ranked[allowed], math.inf))
    else:
        # Too few validation items are not parcel-like to place the limit among them: keep
        # the novelty check meaningful with the farthest validation view.
        limit = float(np.nextafter(max(everything, default=1.0), math.inf))
    return {"parcel_min_logprob": PARCEL_MIN_LOGPROB, "novelty_max": limit,
            "target_rate": OOD_TARGET_RATE, "fitted_items": len(closest),
            "not_parcel_like_items": int(np.isfinite(closest).sum())}


def _recalls(scores: np.ndarray, positive: np.ndarray, subset: np.ndarray,
             nominal_threshold: Mapping[float, float]) -> dict[str, float]:
    """Recall of the damaged items in `subset` at thresholds set on all nominal items."""
    pos = positive & subset
    out = {}
    for fpr, t in nominal_threshold.items():
        out[f"recall_at_fpr_{fpr}"] = float((scores[pos] >= t).mean()) if pos.any() \
            else math.nan
    out["items"] = int(pos.sum())
    return out


def calibration_error(prob: np.ndarray, positive: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: |mean predicted - observed rate| weighted per bin."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(prob, edges[1:-1]), 0, bins - 1)
    err = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            err += float(sel.mean()) * abs(float(prob[sel].mean()) - float(positive[sel].mean()))
    return err


def unseen_products(table: ScoreTable, fusion: Fusion, thresholds: Thresholds,
                    products: int) -> dict[str, Any]:
    """The issue's keys: fused recall at FPRs (thresholds on this split's nominal items),
    per severity and type at FPR 0.5 %, and at the shipped (validation-fitted) threshold:
    recall, false-positive rate, confounder FPR, broken-set recall; calibration error."""
    fused = fused_scores(table, fusion, "full")
    damaged = table.damaged
    at = {fpr: nominal_quantile(fused, damaged, fpr) for fpr in FPRS}
    block: dict[str, Any] = {"products": products, "items": len(fused),
                             "damaged": int(damaged.sum())}
    block["fused"] = {"auroc": roc_auc(fused, damaged),
                      **{f"recall_at_fpr_{f}": recall_at_fpr(fused, damaged, f) for f in FPRS}}
    sev = np.array([s or "" for s in table.severity]) if table.severity else \
        np.full(len(fused), "")
    block["by_severity"] = {s: _recalls(fused, damaged, sev == s, {0.005: at[0.005]})
                            for s in ("subtle", "moderate", "severe") if (sev == s).any()}
    types = np.array([t or "" for t in table.damage_type])
    block["by_type"] = {t: _recalls(fused, damaged, types == t, {0.005: at[0.005]})
                        for t in sorted(set(types) - {""})}
    block["moderate_and_severe"] = _recalls(
        fused, damaged, (sev == "moderate") | (sev == "severe"), {0.005: at[0.005]})
    shipped = thresholds.fused["full"]
    side = fused >= shipped
    conf = ~damaged & table.confounder
    block["shipped_threshold"] = {"threshold": shipped, "recall": float(side[damaged].mean()),
                                  "fpr": float(side[~damaged].mean())}
    block["confounder_fpr"] = float(side[conf].mean()) if conf.any() else math.nan
    block["confounder_items"] = int(conf.sum())
    broken = types == "broken_set"
    block["broken_set_recall"] = float(side[broken].mean()) if broken.any() else math.nan
    block["calibration_error"] = calibration_error(fused, damaged)
    block["components_auroc"] = {
        "classifier": roc_auc(table.damage, damaged),
        "anomaly": _finite_auroc(table.anomaly_raw, damaged),
        "geometry": _finite_auroc(table.geometry, damaged)}
    if table.ood is not None and np.isfinite(table.ood).any():
        block["false_ood_rate"] = float(np.mean([is_out_of_distribution(float(v))
                                                 for v in table.ood]))
    return block


def demo_catalogue(table: ScoreTable, fusion: Fusion, thresholds: Thresholds) -> dict[str, Any]:
    """Recall and false-positive rate at the shipped threshold on items of the demo
    catalogue (the products the live demo runs): what a demo run should observe."""
    fused = fused_scores(table, fusion, "full")
    side = fused >= thresholds.fused["full"]
    damaged = table.damaged
    return {"items": len(fused), "damaged": int(damaged.sum()),
            "recall": float(side[damaged].mean()) if damaged.any() else math.nan,
            "fpr": float(side[~damaged].mean()) if (~damaged).any() else math.nan,
            "auroc": roc_auc(fused, damaged) if damaged.any() and (~damaged).any()
            else math.nan}


def _finite_auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    ok = np.isfinite(scores)
    return roc_auc(scores[ok], positive[ok]) if ok.any() else math.nan


def few_references(inspector: ItemInspector, test: Dataset, damage_threshold: float,
                   ks: Sequence[int] = (1, 3, 10)) -> dict[str, Any]:
    """Gallery anomaly AUROC on unseen products with k reference views per camera; and a
    gallery of 10 views with 20 % damaged ones slipped in, with and without the damage
    check that gates learning."""
    out: dict[str, Any] = {}
    for k in ks:
        enroll(inspector, test, k)
        table = score(inspector, test.items)
        out[f"k{k}"] = _per_product_auroc(table, test.items)
    # Contaminated: per product, 2 of 10 reference views per camera are damaged items'
    # views (those items are left out of the scoring).
    by_product: dict[str, list[ItemRecord]] = {}
    for r in test.items:
        if r.truth is not None and r.truth.damage is not None and r.product_id:
            by_product.setdefault(r.product_id, []).append(r)
    used = {r.item_id for rs in by_product.values() for r in rs[:2]}
    scored = [r for r in test.items if r.item_id not in used]
    for gated in (False, True):
        tmp = Path(tempfile.mkdtemp(prefix="cv-gallery-"))
        inspector.gallery = ReferenceGallery(tmp, model=embedding_identity(inspector.manifest))
        refused = kept = 0
        for pid, by_cam in sorted(test.references.items()):
            bad = by_product.get(pid, [])[:2]
            for cam, crops in sorted(by_cam.items()):
                views = [c.color for c in crops[:10 - len(bad)]]
                views += [r.crops[cam].color for r in bad if cam in r.crops]
                if gated:
                    _, damage = inspector.judge_views(views)
                    passed = [v for v, d in zip(views, damage, strict=True)
                              if d < damage_threshold]
                    refused += len(views) - len(passed)
                    views = passed
                kept += len(views)
                if views:
                    inspector.learn_views(pid, cam, views)
        key = "k10_20pct_damaged_" + ("damage_checked" if gated else "unchecked")
        out[key] = {**_per_product_auroc(score(inspector, scored), scored),
                    "views_kept": kept, "views_refused": refused}
    return out


def _per_product_auroc(table: ScoreTable, records: Sequence[ItemRecord]) -> dict[str, Any]:
    ok = np.isfinite(table.anomaly_raw)
    products = np.array([r.product_id or "" for r in records])
    per = []
    for p in sorted(set(products[ok])):
        sel = ok & (products == p)
        if table.damaged[sel].any() and (~table.damaged[sel]).any():
            per.append(roc_auc(table.anomaly_raw[sel], table.damaged[sel]))
    return {"anomaly_auroc_pooled": _finite_auroc(table.anomaly_raw, table.damaged),
            "anomaly_auroc_per_product_mean": float(np.mean(per)) if per else math.nan,
            "products_measured": len(per)}


@dataclass(frozen=True, slots=True)
class RealPhoto:
    path: Path
    label: str  # intact, damaged, not_parcel


def real_photos(folder: Path) -> list[RealPhoto]:
    """The development photographs: parcels/ (labelled by the folder's README: the one
    whose name says noDMG is intact) and scenes/ (not parcels; RGB frames only)."""
    found = []
    for path in sorted((folder / "parcels").glob("*.jpg")):
        found.append(RealPhoto(path, "intact" if "noDMG" in path.name else "damaged"))
    for path in sorted((folder / "scenes").iterdir()) if (folder / "scenes").exists() else []:
        if path.suffix in (".jpg", ".png") and "depth" not in path.name:
            found.append(RealPhoto(path, "not_parcel"))
    return found


def evaluate_photos(inspector: ItemInspector, photos: Sequence[RealPhoto]) -> dict[str, Any]:
    """RGB only, no product (as `edge-node inspect --rgb PHOTO`), default decisions."""
    policy = VerdictPolicy.from_manifest(inspector.manifest, DecisionConfig())
    rows: dict[str, dict[str, Any]] = {}
    for photo in photos:
        loaded = load_photo(photo.path, None, product=None, product_id=None,
                            size=inspector.size)
        inf = inspector.infer([loaded.record])[0]
        verdict = policy.decide(loaded.record, inf, now_ms=0.0)
        rows[photo.path.name] = {
            "label": photo.label, "damage": inf.damage, "fused": inf.fused, "ood": inf.ood,
            "out_of_distribution": is_out_of_distribution(inf.ood),
            "decision": verdict.decision.value, "reasons": [r.value for r in verdict.reasons]}
    intact = [float(r["fused"]) for r in rows.values() if r["label"] == "intact"]
    damaged = [float(r["fused"]) for r in rows.values() if r["label"] == "damaged"]
    scenes = [r for r in rows.values() if r["label"] == "not_parcel"]
    parcels = [r for r in rows.values() if r["label"] != "not_parcel"]
    return {
        "photos": rows,
        "every_damaged_above_every_intact": bool(intact and damaged
                                                 and min(damaged) > max(intact)),
        "intact_pass": all(r["decision"] == "pass" for r in rows.values()
                           if r["label"] == "intact"),
        "scenes_flagged_ood": sum(r["out_of_distribution"] for r in scenes),
        "scenes": len(scenes),
        "parcels_flagged_ood": sum(r["out_of_distribution"] for r in parcels),
        "parcels": len(parcels),
    }
