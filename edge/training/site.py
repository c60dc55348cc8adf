"""A candidate model set from a site's own labels: `edge-node train`.

    export (labelled snapshots) ─► items, split by item ID: train | held out
    train split (+ synthetic items) ─► backbone features (the shipped embedding, ONNX Runtime)
        ─► the current damage head, fine-tuned ─► damage.onnx
    held out ─► fusion and thresholds refitted ─► golden expectations recomputed
        ─► candidate and current models compared on the same held-out items
    ─► CANDIDATE/: manifest.yaml, embedding/ (copied), damage/ (retrained), gallery seed,
       golden/, metrics.json, model cards

The candidate folder has the layout of `engines/`; `tools/make_bundle.py build --kind models`
packs it into a models bundle. It is written beside its final place and renamed into it
whole (every file fsynced first): a folder at `--out` is always a complete candidate.

Both models score against the node's reference gallery when given one (`TrainOptions.gallery`,
read and never written), else the manifest's shipped references: products the site added to
its gallery then have no anomaly score, and the fusion learns nothing from the gallery (the
metrics count the held-out items per input combination, and warn when none had them all).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch

from edge.catalogue import load_catalogue
from edge.config import DecisionConfig, ModelsConfig, load_config
from edge.durable import fsync_dir, sync_tree, write_atomic
from edge.infer.dataset import load_dataset
from edge.infer.fit import ScoreTable, fit_fusion, fit_thresholds, roc_auc, thresholds_to_mapping
from edge.infer.fusion import COMBOS, Fusion, Thresholds
from edge.infer.gallery import ReferenceGallery
from edge.infer.golden import (
    COMPARED,
    golden_scores,
    golden_self_test,
    load_golden,
    stage_expectations,
)
from edge.infer.inspector import DAMAGE, EMBEDDING, ItemInference, ItemInspector
from edge.infer.manifest import Manifest, load_manifest, sha256_file, write_manifest
from edge.infer.offline import memory_inspector
from edge.infer.runtimes import open_backend
from edge.sim.dataset import SPLIT_DEFAULTS, write_dataset
from edge.training.finetune import (
    HeadError,
    HeadTensors,
    LabelledCrop,
    build_tensors,
    finetune,
    head_outputs,
    load_head,
)
from edge.training.heads import DamageHead, export_damage
from edge.training.site_card import CARD, write_site_cards
from edge.training.site_data import (
    HELD_OUT_SHARE,
    SiteData,
    SiteItem,
    SiteSplit,
    check_labels,
    check_out,
    item_bucket,
    load_export,
    split_by_item,
)
from edge.types import ItemRecord
from edge.verdicts.policy import VerdictPolicy

log = structlog.get_logger(__name__)

#: Torch weights of the head, beside its ONNX file (tools/train_models.py writes them there).
HEAD_WEIGHTS = "damage_head.pt"
#: The torch head and its ONNX export must agree this closely before and after training.
ONNX_AGREEMENT = 1e-3
#: (stage, share of the whole run) in the order they run; drives the progress bar.
STAGES = (("load", 0.05), ("synthetic", 0.15), ("features", 0.2), ("finetune", 0.35),
          ("calibrate", 0.1), ("golden", 0.05), ("compare", 0.1))

#: Where a run is: (stage, share of the whole run done).
Progress = Callable[[str, float], None]


class TrainError(RuntimeError):
    """The candidate could not be made; the message says why."""


@dataclass(frozen=True, slots=True)
class TrainOptions:
    data: Path  # an `edge-node snapshots export` folder
    out: Path  # the candidate folder (must not exist, or be empty)
    manifest: Path  # the current models
    synthetic: int = 0  # synthetic items mixed into the training split
    epochs: int = 6
    lr: float = 1e-3
    seed: int = 0
    threads: int = 2
    target_fpr: float | None = None  # None: the current thresholds' target
    version: str | None = None  # None: the current version with a `site` stamp
    held_out: float = HELD_OUT_SHARE
    gallery: Path | None = None  # the node's gallery folder, read only (None: shipped views)


@dataclass(slots=True)
class TrainResult:
    out: Path
    version: str
    manifest_sha256: str
    metrics: dict[str, Any] = field(default_factory=dict)
    #: what the candidate's user must know (also in metrics.json and the model card)
    warnings: list[str] = field(default_factory=list)


class _Bar:
    """Stage progress -> share of the whole run."""

    def __init__(self, report: Progress, synthetic: bool) -> None:
        self.report = report
        stages = [(s, w) for s, w in STAGES if synthetic or s != "synthetic"]
        total = sum(w for _, w in stages)
        self.start: dict[str, float] = {}
        self.share: dict[str, float] = {}
        done = 0.0
        for stage, w in stages:
            self.start[stage], self.share[stage] = done, w / total
            done += w / total

    def __call__(self, stage: str, fraction: float = 0.0) -> None:
        self.report(stage, self.start[stage] + self.share[stage] * min(max(fraction, 0.0), 1.0))

    def step(self, stage: str) -> Callable[[float], None]:
        return lambda fraction: self(stage, fraction)


def default_version(current: str, now_s: float | None = None) -> str:
    """The current version with a UTC stamp in its local label: 1.0.0+20261123 becomes
    1.0.0+20261123.site202612071530 (PEP 440, ordered after the current one)."""
    stamp = time.strftime("%Y%m%d%H%M", time.gmtime(now_s))
    return f"{current}.site{stamp}" if "+" in current else f"{current}+site{stamp}"


def _site_crops(items: Sequence[SiteItem]) -> list[LabelledCrop]:
    return [LabelledCrop(crop, i.damaged) for i in items for crop in i.record.crops.values()]


def _synthetic_crops(records: Sequence[ItemRecord], weight: float) -> list[LabelledCrop]:
    out = []
    for r in records:
        damage = None if r.truth is None or r.truth.damage is None else r.truth.damage.value
        for crop in r.crops.values():
            # A damage the view does not show (hidden by the angle) is no damage to learn.
            visible = damage is not None and (crop.truth_damage is None
                                              or bool(crop.truth_damage.any()))
            out.append(LabelledCrop(crop, visible, damage if visible else None, typed=True,
                                    weight=weight))
    return out


def synthetic_items(n: int, seed: int, folder: Path, workers: int) -> list[ItemRecord]:
    """`n` synthetic items drawn as the shipped models' training split draws them (damage
    across the severity spectrum, the line's nuisances), of the demo catalogue's products,
    cut out by the node's own code."""
    spec = dataclasses.replace(SPLIT_DEFAULTS["train"][0], items=n, seed=seed, references=0,
                               split=None)
    write_dataset(folder, load_config(None), load_catalogue(), spec, workers=workers)
    return list(load_dataset(folder).items)


def site_table(items: Sequence[SiteItem], results: Sequence[ItemInference]) -> ScoreTable:
    """The scores of labelled site items, with their labels as the truth."""
    def nan(v: float | None) -> float:
        return float("nan") if v is None else v

    damaged = np.array([i.damaged for i in items])
    return ScoreTable(damage=np.array([r.damage for r in results]),
                      anomaly_raw=np.array([nan(r.anomaly_raw) for r in results]),
                      geometry=np.array([nan(r.geometry) for r in results]),
                      damaged=damaged,
                      damage_type=tuple("site" if d else None for d in damaged),
                      confounder=np.zeros(len(items), bool))


def sidelined(policy: VerdictPolicy, items: Sequence[SiteItem],
              results: Sequence[ItemInference]) -> np.ndarray:
    """What the node's verdict policy decides for each item."""
    return np.array([policy.decide(i.record, r, now_ms=0.0).decision.value == "sideline"
                     for i, r in zip(items, results, strict=True)])


def _policy(manifest: Manifest, thresholds: Thresholds | None = None) -> VerdictPolicy:
    if thresholds is None:
        return VerdictPolicy.from_manifest(manifest, DecisionConfig())
    return VerdictPolicy(thresholds, DecisionConfig(), manifest.model_versions())


def _rates(side: np.ndarray, damaged: np.ndarray) -> dict[str, float]:
    def share(mask: np.ndarray) -> float:
        return float(side[mask].mean()) if mask.any() else float("nan")

    return {"recall": share(damaged), "false_positive_rate": share(~damaged),
            "sideline_rate": float(side.mean()) if side.size else float("nan")}


def resolved_target(target: float, intact: int) -> float:
    """The false-positive rate thresholds fitted on `intact` good items can be held to:
    `target`, or 1/(intact+1) when those items cannot tell lower rates apart."""
    return max(target, 1.0 / (intact + 1))


def by_combination(items: Sequence[SiteItem],
                   results: Sequence[ItemInference]) -> dict[str, dict[str, int]]:
    """Items per input combination (gallery and depth: `full`, ...), damaged and intact: the
    fusion weights and the threshold of a combination are fitted on its items alone."""
    out = {c: {"items": 0, "damaged": 0, "intact": 0} for c in COMBOS}
    for item, result in zip(items, results, strict=True):
        row = out[result.combo]
        row["items"] += 1
        row["damaged" if item.damaged else "intact"] += 1
    return out


def _fused_with(result: ItemInference, fusion: Fusion) -> ItemInference:
    """`result` as models with `fusion` would have scored it (the same model outputs)."""
    anomaly = fusion.normalize_anomaly(result.anomaly_raw)
    return dataclasses.replace(result, anomaly=anomaly,
                               fused=fusion.fuse(result.damage, anomaly, result.geometry))


def two_fold(held: Sequence[SiteItem], results: Sequence[ItemInference], manifest: Manifest,
             target: float) -> dict[str, float]:
    """Recall and false-positive rate of the candidate's models with fusion and thresholds
    refitted on one half of the held-out items (by item ID) and judged on the other, both
    ways round. NaN when a half holds no intact item to fit thresholds on."""
    damaged = np.array([i.damaged for i in held])
    fold = np.array([item_bucket(i.item_id, "fold") < 0.5 for i in held])
    side = np.zeros(len(held), bool)
    for judged in (fold, ~fold):
        fit = [int(j) for j in np.flatnonzero(~judged)]
        if damaged[fit].all():
            nan = float("nan")
            return {"recall": nan, "false_positive_rate": nan, "sideline_rate": nan}
        part = site_table([held[j] for j in fit], [results[j] for j in fit])
        fusion = fit_fusion(part)
        policy = _policy(manifest, fit_thresholds(part, fusion, target))
        rows = [int(j) for j in np.flatnonzero(judged)]
        side[rows] = sidelined(policy, [held[j] for j in rows],
                               [_fused_with(results[j], fusion) for j in rows])
    return _rates(side, damaged)


def compare(held: Sequence[SiteItem], current: tuple[Manifest, list[ItemInference]],
            candidate: tuple[Manifest, list[ItemInference]], target: float) -> dict[str, Any]:
    """Both models on the same held-out items, each at its own thresholds. The candidate's
    fusion and thresholds were fitted on these very items, so its recall and false-positive
    rate are also given two-fold (`two_fold`)."""
    damaged = np.array([i.damaged for i in held])
    out: dict[str, Any] = {"items": len(held), "damaged": int(damaged.sum()),
                           "intact": int((~damaged).sum()),
                           "item_ids": [i.item_id for i in held]}
    sides = {}
    for name, (manifest, results) in (("current", current), ("candidate", candidate)):
        if len(results) != len(held):
            raise TrainError(f"the {name} models judged {len(results)} of the {len(held)} "
                             "held-out items")
        sides[name] = sidelined(_policy(manifest), held, results)
        fused = np.array([r.fused for r in results])
        out[name] = {"version": manifest.version, "thresholds": manifest.threshold_version,
                     "items": len(results), "by_combination": by_combination(held, results),
                     "auroc": roc_auc(np.nan_to_num(fused, nan=1.0), damaged),
                     **_rates(sides[name], damaged)}
    missed = damaged & ~sides["current"]
    out["current_misses"] = int(missed.sum())
    out["current_misses_caught_by_candidate"] = int((missed & sides["candidate"]).sum())
    out["candidate"]["two_fold"] = two_fold(held, candidate[1], candidate[0], target)
    return out


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A folder beside `out` that becomes `out` when the block succeeds (every file in it
    durable before the rename)."""
    check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield staging
        sync_tree(staging)
        if out.exists():
            out.rmdir()
        os.rename(staging, out)  # a whole folder (edge.durable replaces files)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _copy_models(current: Manifest, staging: Path) -> None:
    """What the candidate keeps of the current models: the embedding, the gallery seed, the
    golden set (its expectations are replaced later) and the model cards."""
    base = current.path.parent
    embedding = current.model(EMBEDDING).path
    keep = [embedding, embedding.with_name(CARD), base / str(current.golden["file"])]
    seed = current.raw.get("gallery_seed")
    if isinstance(seed, dict):
        keep.append(base / str(seed["file"]))
    for src in keep:
        if src.is_file():
            dest = staging / src.relative_to(base)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest)
    damage = staging / current.model(DAMAGE).path.relative_to(base)
    damage.parent.mkdir(parents=True, exist_ok=True)


def _check_onnx(head: DamageHead, onnx_probs: np.ndarray, data: HeadTensors, n: int,
                what: str, error: type[Exception] = HeadError) -> float:
    """`error` unless the torch head and an ONNX model give the same damage probability."""
    torch_probs = head_outputs(head, data, n)
    diff = float(np.abs(torch_probs - onnx_probs).max()) if n else 0.0
    if diff > ONNX_AGREEMENT:
        raise error(f"{what}: torch and ONNX disagree by {diff:.2e} (more than "
                    f"{ONNX_AGREEMENT:g})")
    return diff


def _onnx_probs(inspector: ItemInspector, data: HeadTensors, n: int) -> np.ndarray:
    out = inspector.damage.run({"trunk": data.trunk[:n].numpy(),
                                "depth": data.depth[:n].float().numpy()})
    probs: np.ndarray = out["probs"][:, 0]
    return probs


class _Laps:
    """Wall time per stage (metrics.json and the model card)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.timings: dict[str, float] = {}

    def __call__(self, name: str) -> None:
        self.timings[name] = round(self.elapsed() - sum(self.timings.values()), 1)

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def train_candidate(opts: TrainOptions, report: Progress | None = None) -> TrainResult:
    """Fine-tune, calibrate, check and write a candidate model set (see the module doc)."""
    bar = _Bar(report or (lambda _s, _f: None), opts.synthetic > 0)
    lap = _Laps()
    check_out(opts.out)
    torch.set_num_threads(opts.threads)
    bar("load")
    data = load_export(opts.data)
    check_labels(opts.data, data.items, opts.held_out)
    split = split_by_item(data.items, opts.held_out)
    current = load_manifest(opts.manifest)
    head = load_head(current.model(DAMAGE).path.with_name(HEAD_WEIGHTS))
    now_inspector = memory_inspector(
        ModelsConfig(manifest=opts.manifest, intra_op_threads=opts.threads), opts.gallery)
    try:
        lap("load")
        return _train(opts, data, split, current, head, now_inspector, bar, lap)
    finally:
        now_inspector.close()


def _train(opts: TrainOptions, data: SiteData, split: SiteSplit[SiteItem], current: Manifest,
           head: DamageHead, now_inspector: ItemInspector, bar: _Bar, lap: _Laps
           ) -> TrainResult:
    version = opts.version or default_version(current.version)
    with tempfile.TemporaryDirectory(prefix="cv-train-") as tmp:
        crops = _site_crops(split.train)
        synthetic: list[ItemRecord] = []
        if opts.synthetic > 0:
            bar("synthetic")
            synthetic = synthetic_items(opts.synthetic, opts.seed + 7001, Path(tmp) / "synth",
                                        opts.threads)
            # The site's items carry as much weight as the synthetic ones, however many.
            weight = min(1.0, len(split.train) / max(len(synthetic), 1))
            crops += _synthetic_crops(synthetic, weight)
            lap("synthetic")
    bar("features")
    tensors = build_tensors(crops, now_inspector, bar.step("features"))
    probe = min(32, len(tensors))
    weights = current.model(DAMAGE).path.with_name(HEAD_WEIGHTS)
    _check_onnx(head, _onnx_probs(now_inspector, tensors, probe), tensors, probe,
                f"{weights} against {weights.with_name(current.model(DAMAGE).path.name)} "
                "(not the weights it was exported from)")
    lap("features")
    bar("finetune")
    losses = finetune(head, tensors, epochs=opts.epochs, lr=opts.lr, seed=opts.seed,
                      progress=bar.step("finetune"))
    lap("finetune")
    with _staging(opts.out) as staging:
        result = _package(opts, current, version, head, tensors, probe, staging, split,
                          now_inspector, bar, lap)
        total = lap.elapsed()
        result.metrics.update(
            version=version, base_version=current.version, data=opts.data.name,
            labels=_label_summary(data, split), synthetic_items=len(synthetic),
            epochs=opts.epochs, losses=[round(x, 4) for x in losses],
            training_seconds=round(total, 1), timings_s=lap.timings,
            items_per_second=round((len(data.items) + len(synthetic)) / max(total, 1e-6), 2),
            gallery=str(opts.gallery) if opts.gallery is not None else "shipped",
            warnings=result.warnings)
        _write_json(staging / "metrics.json", result.metrics)
        write_site_cards(staging, result.metrics, current)
    log.info("candidate_written", out=str(opts.out), version=version,
             manifest_sha256=result.manifest_sha256)
    return result


def _label_summary(data: SiteData, split: SiteSplit[SiteItem]) -> dict[str, Any]:
    def count(items: Sequence[SiteItem]) -> dict[str, int]:
        return {"damaged": sum(i.damaged for i in items),
                "intact": sum(not i.damaged for i in items)}

    sources: dict[str, int] = {}
    for i in data.items:
        sources[i.source] = sources.get(i.source, 0) + 1
    return {"items": len(data.items), **count(data.items), "by_source": sources,
            "skipped": dict(data.skipped), "train": count(split.train),
            "held_out": count(split.held_out)}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=2, allow_nan=True) + "\n")


def _package(opts: TrainOptions, current: Manifest, version: str, head: DamageHead,
             tensors: HeadTensors, probe: int, staging: Path, split: SiteSplit[SiteItem],
             now_inspector: ItemInspector, bar: _Bar, lap: _Laps) -> TrainResult:
    bar("calibrate")
    _copy_models(current, staging)
    onnx_path = staging / current.model(DAMAGE).path.relative_to(current.path.parent)
    export_damage(head, onnx_path, now_inspector.size)
    torch.save(head.state_dict(), onnx_path.with_name(HEAD_WEIGHTS))
    raw = json.loads(json.dumps(dict(current.raw)))  # a deep copy of plain YAML data
    raw["version"] = version
    raw["models"][DAMAGE].update(version=version, sha256=sha256_file(onnx_path))
    manifest_path = staging / current.path.name
    write_manifest(manifest_path, raw)
    candidate = _beside(now_inspector, manifest_path, opts.threads)
    _check_onnx(head, _onnx_probs(candidate, tensors, probe), tensors, probe,
                f"the exported {onnx_path.name}", TrainError)
    held = split.held_out
    records = [i.record for i in held]
    table = site_table(held, candidate.infer(records))
    fusion = fit_fusion(table)
    requested = opts.target_fpr if opts.target_fpr is not None else float(
        current.thresholds.get("target_fpr", 0.005))
    intact = sum(not i.damaged for i in held)
    target = resolved_target(requested, intact)
    warnings = []
    if target > requested:
        warnings.append(
            f"the thresholds were fitted on {intact} intact held-out items, which cannot tell "
            f"false-positive rates below {target:.2%} apart: the candidate's target_fpr is "
            f"{target:.2%}, not the {requested:.2%} asked for (about {math.ceil(1 / requested)} "
            "intact held-out items would do: label more passes, or export a longer period)")
    thresholds = fit_thresholds(table, fusion, target, version=version)
    raw["fusion"] = {**fusion.to_mapping(), "geometry": current.fusion.get("geometry", {})}
    raw["thresholds"] = {**thresholds_to_mapping(thresholds, f"site:{opts.data.name}",
                                                 len(held)),
                         "requested_target_fpr": requested}
    raw["training"] = {"base_version": current.version, "method": "edge-node train",
                       "data": opts.data.name, "synthetic_items": opts.synthetic}
    lap("calibrate")
    bar("golden")
    _write_golden(candidate, raw, manifest_path)
    candidate.damage.close()
    candidate = _beside(now_inspector, manifest_path, opts.threads)  # as written, verified
    report = golden_self_test(candidate)
    if not report.passed:
        raise TrainError(f"the candidate fails its own golden self-test: {report.failures[:3]}")
    lap("golden")
    bar("compare")
    cand_results = candidate.infer(records)
    compared = compare(held, (current, now_inspector.infer(records)),
                       (candidate.manifest, cand_results), target)
    full = compared["candidate"]["by_combination"]["full"]["items"]
    if not full:
        warnings.append(
            f"none of the {len(held)} held-out items was scored with every input (reference "
            "gallery and depth: the `full` combination), so its fusion weights and threshold "
            "were fitted on no item: items the node scores with both are judged on the "
            "classifier alone. If the site's products are in the node's gallery, give it "
            "(--config or --gallery)")
    metrics = {"held_out": compared, "target_fpr": target, "requested_target_fpr": requested}
    candidate.damage.close()
    lap("compare")
    bar("compare", 1.0)
    return TrainResult(opts.out, version, sha256_file(manifest_path), metrics, warnings)


def _beside(base: ItemInspector, manifest_path: Path, threads: int) -> ItemInspector:
    """The candidate of `manifest_path` (verified), sharing `base`'s embedding session and
    gallery: its embedding is the same file, so its patch features are the same too."""
    manifest = load_manifest(manifest_path)
    if manifest.model(EMBEDDING).sha256 != base.manifest.model(EMBEDDING).sha256:
        raise TrainError(f"{manifest_path}: the embedding is not the current one")
    cfg = ModelsConfig(manifest=manifest_path, intra_op_threads=threads,
                       max_batch=base.cfg.max_batch, gallery_dir=base.cfg.gallery_dir)
    return ItemInspector(manifest, base.embedding, open_backend(manifest.model(DAMAGE), cfg),
                         gallery=base.gallery, catalogue=base.catalogue, cfg=cfg)


def _write_golden(candidate: ItemInspector, raw: dict[str, Any], manifest_path: Path) -> None:
    """The current golden items and references, with the candidate's expected scores (what
    the self-test compares). The manifest naming it is written after the file."""
    inspector = ItemInspector(
        dataclasses.replace(candidate.manifest, fusion=raw["fusion"],
                            thresholds=raw["thresholds"], raw=raw),
        candidate.embedding, candidate.damage, gallery=ReferenceGallery(None),
        catalogue=candidate.catalogue, cfg=candidate.cfg)
    path = manifest_path.parent / str(raw["golden"]["file"])
    results = golden_scores(inspector, load_golden(path))
    expected = {key: np.array([np.nan if getattr(r, key) is None else getattr(r, key)
                               for r in results], np.float64) for key in COMPARED}
    stage_expectations(path, expected).replace(path)
    fsync_dir(path.parent)
    raw["golden"] = {**raw["golden"], "sha256": sha256_file(path)}
    write_manifest(manifest_path, raw)
