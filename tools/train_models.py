"""Train, export, calibrate and evaluate the default models; writes everything into `engines/`.

    python tools/train_models.py --generate            # synthetic splits, then train
    python tools/train_models.py --generate --capacity # also the capacity table (3 sizes)

Three synthetic splits whose products never overlap (`edge-node synth dataset --split`):
train (the damage head, the novelty statistics), validation (fusion weights, thresholds,
the out-of-distribution limit, all on products training never saw), test (the metrics in
`engines/metrics.json` and the model cards, on products neither training nor fitting saw).
A fourth, small set of the demo catalogue's products gives the gallery seed and the golden
items the node ships with. CPU only (torch 2.13); the frozen backbone's features are
computed once per input size, then a small head is trained on them.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge.catalogue import Catalogue, load_catalogue
from edge.config import ModelsConfig
from edge.infer.dataset import Dataset, load_dataset
from edge.infer.fit import (
    fit_fusion,
    fit_thresholds,
    fused_scores,
    recall_at_fpr,
    roc_auc,
    thresholds_to_mapping,
)
from edge.infer.fusion import Fusion, Thresholds
from edge.infer.golden import golden_scores, load_golden
from edge.infer.inspector import ItemInspector
from edge.infer.manifest import load_manifest, sha256_file, write_manifest
from edge.infer.size_check import RIGID_PACKAGING, fill_ratio
from edge.training import evaluation, package
from edge.training.cards import write_cards
from edge.training.effnet import Trunk, load_lite0
from edge.training.features import build
from edge.training.fit_head import train_head
from edge.training.heads import export_damage, export_embedding

REPO = Path(__file__).resolve().parent.parent
REAL_PHOTOS = REPO.parent / "shared" / "real-photos"
#: split -> (items, reference items per product, products)
SPLITS = {"train": (2400, 3, 240), "val": (1200, 3, 120), "test": (1500, 10, 100)}
CROP_SIZE = 192  # the datasets' crops; each model size resizes from them
SIZES = (128, 160, 192)


def generate(root: Path, scale: float = 1.0) -> dict[str, Path]:
    """The three product-disjoint splits and the demo catalogue's items and references
    (`scale`: a fraction of the items and products, for a quick check of the pipeline)."""
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "crops.yaml"
    cfg.write_text(f"items:\n  crop_size: {CROP_SIZE}\n", encoding="utf-8")
    out = {}
    for split, (full_items, refs, full_products) in SPLITS.items():
        items, products = max(8, round(full_items * scale)), max(4, round(full_products * scale))
        path = root / split
        if not (path / "index.jsonl").exists():
            subprocess.run([sys.executable, "-m", "edge", "synth", "dataset", "--split", split,
                            "--out", str(path), "--items", str(items), "--products",
                            str(products), "--references", str(refs), "--config", str(cfg)],
                           check=True)
        out[split] = path
    demo = root / "demo_references"
    if not (demo / "index.jsonl").exists():
        subprocess.run([sys.executable, "-m", "edge", "synth", "dataset", "--out", str(demo),
                        "--items", str(max(40, round(300 * scale))), "--damage-rate", "0.6",
                        "--references", "4",
                        "--seed", "44", "--config", str(cfg)], check=True)
    out["demo_references"] = demo
    return out


def expected_fill(train: Dataset, catalogue: Catalogue) -> dict[str, float]:
    """Median fill ratio of nominal items' top views, per packaging."""
    ratios: dict[str, list[float]] = {}
    for rec in train.items:
        product = None if rec.product_id is None else catalogue.get(rec.product_id)
        crop = rec.crops.get("top")
        if product is None or crop is None or rec.truth is None or rec.truth.damage is not None:
            continue
        r = fill_ratio(crop)
        if r is not None:
            ratios.setdefault(product.packaging, []).append(r)
    return {k: float(np.median(v)) for k, v in sorted(ratios.items())}


class Laps:
    """Wall time per training stage (recorded in metrics.json and the model cards)."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.timings: dict[str, float] = {}

    def __call__(self, name: str) -> None:
        now = time.monotonic()
        self.timings[name] = round(now - self.last, 1)
        self.last = now
        print(f"[{name}] {self.timings[name]} s", flush=True)

    def total(self) -> float:
        return round(sum(self.timings.values()), 1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("/tmp/conveyor-vision-data"),
                    help="where the datasets are (written there with --generate)")
    ap.add_argument("--generate", action="store_true", help="write missing datasets into --data")
    ap.add_argument("--generated-in", type=float, default=None, metavar="SECONDS",
                    help="wall time of a separate generation run, recorded with the timings")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="generate this fraction of the items and products (a quick check)")
    ap.add_argument("--engines", type=Path, default=REPO / "engines")
    ap.add_argument("--size", type=int, default=160, choices=SIZES, help="model input size")
    ap.add_argument("--capacity", action="store_true",
                    help="train every size of --sizes and write the capacity table")
    ap.add_argument("--sizes", type=int, nargs="+", choices=SIZES, default=list(SIZES),
                    help="with --capacity: the sizes to train and compare")
    ap.add_argument("--recalibrate", type=Path, nargs="+", default=None, metavar="ENGINES",
                    help="keep the networks trained into these folders; refit everything "
                         "after them (geometry, fusion, thresholds, OOD limit, golden set) "
                         "and measure")
    ap.add_argument("--earlier-run", type=Path, default=None, metavar="METRICS_JSON",
                    help="with --recalibrate: the metrics.json of the run that trained these "
                         "networks; its training timings join this run's, so that "
                         "training_seconds covers the whole pipeline")
    ap.add_argument("--note", default=None,
                    help="a sentence for the model card on how these figures were made")
    ap.add_argument("--golden-items", type=Path, default=None, metavar="GOLDEN_NPZ",
                    help="the golden items of this golden file (re-scored by the new models) "
                         "instead of items picked from the demo split")
    ap.add_argument("--compare-with", type=Path, default=None, metavar="METRICS_JSON",
                    help="metrics.json of the models these would replace, measured on the "
                         "same splits (--measure): the cards show both side by side")
    ap.add_argument("--measure", type=Path, nargs="+", default=None, metavar="ENGINES",
                    help="measure models already trained into these folders (no training); "
                    "with --capacity, the table over them and the choice")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target-fpr", type=float, default=0.005)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--photos", type=Path, default=REAL_PHOTOS,
                    help="real photographs to evaluate on (never trained on)")
    ap.add_argument("--version", default=time.strftime("2.0.0+%Y%m%d", time.gmtime()))
    return ap.parse_args(argv)


class Splits:
    def __init__(self, paths: dict[str, Path]) -> None:
        self.paths = paths
        self.train = load_dataset(paths["train"])
        self.val = load_dataset(paths["val"])
        self.test = load_dataset(paths["test"])
        self.demo = load_dataset(paths["demo_references"])
        self.catalogue = {name: load_catalogue(p / "catalogue.yaml") for name, p in paths.items()}
        products = {name: {str(r.product_id) for r in getattr(self, name).items}
                    for name in ("train", "val", "test")}
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            if products[a] & products[b]:
                raise SystemExit(f"{b} products are also in {a}: "
                                 f"{sorted(products[a] & products[b])[:5]}")


#: The top-face depression (mm) the geometry check counts as a full deficit; fusion
#: weighs it against the other inputs, so the scale only sets the units.
SURFACE_FULL_MM = 25.0


def train_size(size: int, splits: Splits, engines: Path, args: argparse.Namespace,
               lap: Laps) -> dict[str, Any]:
    """Everything for one input size into `engines`; returns its metrics."""
    for sub in ("embedding", "damage", "golden"):
        (engines / sub).mkdir(parents=True, exist_ok=True)
    trunk = Trunk(load_lite0()).eval()
    tensors = build(splits.train, trunk, size)
    trunk.fit_novelty(tensors.pooled)
    lap(f"features_{size}")
    head = train_head(tensors, epochs=args.epochs, seed=args.seed)
    del tensors
    lap(f"train_head_{size}")
    export_embedding(trunk, engines / "embedding" / "embedding.onnx", size)
    export_damage(head, engines / "damage" / "damage.onnx", size)
    torch.save(head.state_dict(), engines / "damage" / "damage_head.pt")
    return calibrate(size, splits, engines, args, lap)


def calibrate(size: int, splits: Splits, engines: Path, args: argparse.Namespace,
              lap: Laps) -> dict[str, Any]:
    """Everything after the networks: gallery seed, geometry constants, fusion, thresholds
    and the out-of-distribution limit fitted on validation, then the test metrics and the
    golden set. `--recalibrate` runs it alone on trained folders (a changed geometry check or
    fusion needs no new networks)."""
    seed_info = package.write_gallery_seed(engines / "gallery_seed.npz", splits.demo,
                                           per_product=4)
    fixed: dict[str, Any] = {
        "geometry": {"expected_fill": expected_fill(splits.train, splits.catalogue["train"]),
                     "slack": 0.0, "surface_full_mm": SURFACE_FULL_MM,
                     "surface_packaging": list(RIGID_PACKAGING)},
        "extra": {"gallery_seed": seed_info}}
    placeholder = {"version": "uncalibrated", "target_fpr": args.target_fpr,
                   "fused": dict.fromkeys(package.COMBOS, 0.5), "components": {}}
    manifest = engines / "manifest.yaml"
    write_manifest(manifest, package.manifest_data(
        engines, args.version, size, fusion=package.neutral_fusion(), thresholds=placeholder,
        **fixed))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ModelsConfig(manifest=manifest, gallery_dir=Path(tmp) / "gallery",
                           intra_op_threads=args.threads)
        inspector = ItemInspector.load(cfg, splits.catalogue["val"])
        evaluation.enroll(inspector, splits.val, evaluation.EVAL_REFERENCES)
        table = evaluation.score(inspector, splits.val.items)
        fusion = fit_fusion(table)
        thresholds = fit_thresholds(table, fusion, args.target_fpr, version=args.version)
        val_fused = fused_scores(table, fusion, "full")
        val = {"fused_auroc": roc_auc(val_fused, table.damaged),
               "recall_at_fpr_0.005": recall_at_fpr(val_fused, table.damaged, 0.005)}
        ood = evaluation.fit_ood(evaluation.view_signals(inspector, splits.val.items))
        data = package.manifest_data(
            engines, args.version, size, fusion=fusion,
            thresholds=thresholds_to_mapping(thresholds, "val", len(splits.val.items)),
            **fixed)
        data["ood"] = ood
        write_manifest(manifest, data)
        inspector.close()
        lap(f"calibrate_val_{size}")
        metrics = evaluate(manifest, cfg, splits, fusion, thresholds, args)
        lap(f"evaluate_test_{size}")
        write_golden_set(manifest, cfg, splits, data, args.golden_items)
        lap(f"golden_{size}")
    metrics["size"] = size
    metrics["validation"] = val
    metrics["ood_rule"] = ood
    metrics["cost"] = measure_cost(manifest, args.threads)
    return metrics


def measure_trained(engines: Path, splits: Splits, args: argparse.Namespace,
                    lap: Laps) -> dict[str, Any]:
    """The metrics of models already trained into `engines` (as `train_size` returns them),
    without training: to re-measure committed models on the same splits."""
    manifest = engines / "manifest.yaml"
    loaded = load_manifest(manifest)
    fusion, thresholds = Fusion.from_mapping(loaded.fusion), Thresholds.from_mapping(
        loaded.thresholds)
    size = int(loaded.model("embedding").preprocessing["size"])
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ModelsConfig(manifest=manifest, gallery_dir=Path(tmp) / "gallery",
                           intra_op_threads=args.threads)
        inspector = ItemInspector.load(cfg, splits.catalogue["val"])
        evaluation.enroll(inspector, splits.val, evaluation.EVAL_REFERENCES)
        table = evaluation.score(inspector, splits.val.items)
        inspector.close()
        val_fused = fused_scores(table, fusion, "full")
        metrics = evaluate(manifest, cfg, splits, fusion, thresholds, args)
    lap(f"measure_{size}")
    metrics.update(size=size, version=loaded.version, ood_rule=dict(loaded.raw.get("ood") or {}),
                   validation={"fused_auroc": roc_auc(val_fused, table.damaged),
                               "recall_at_fpr_0.005": recall_at_fpr(val_fused, table.damaged,
                                                                    0.005)},
                   cost=measure_cost(manifest, args.threads))
    return metrics


def evaluate(manifest: Path, cfg: ModelsConfig, splits: Splits, fusion: Fusion,
             thresholds: Thresholds, args: argparse.Namespace) -> dict[str, Any]:
    inspector = ItemInspector.load(cfg, splits.catalogue["test"], manifest)
    evaluation.enroll(inspector, splits.test, evaluation.EVAL_REFERENCES)
    table = evaluation.score(inspector, splits.test.items)
    products = len({r.product_id for r in splits.test.items})
    out: dict[str, Any] = {
        "unseen_products": evaluation.unseen_products(table, fusion, thresholds, products)}
    out["unseen_products"]["few_references"] = evaluation.few_references(
        inspector, splits.test, thresholds.components["damage"])
    inspector.close()
    demo = ItemInspector.load(cfg, splits.catalogue["demo_references"], manifest)
    evaluation.enroll(demo, splits.demo, evaluation.EVAL_REFERENCES)
    out["demo_catalogue"] = evaluation.demo_catalogue(
        evaluation.score(demo, splits.demo.items), fusion, thresholds)
    if args.photos.exists():
        out["real_photos"] = evaluation.evaluate_photos(demo,
                                                        evaluation.real_photos(args.photos))
    demo.close()
    return out


def write_golden_set(manifest: Path, cfg: ModelsConfig, splits: Splits,
                     data: dict[str, Any], items_from: Path | None = None) -> None:
    """Golden items of the demo catalogue's products (what the shipped node inspects),
    expectations as the self-test computes them. `items_from`: take the items of that
    golden file instead of picking them from the demo split (the same items across model
    versions; the demo split may lack an item of some label)."""
    inspector = ItemInspector.load(cfg, splits.catalogue["demo_references"], manifest)
    records = package.pick_golden(splits.demo.items) if items_from is None else \
        package.labelled_records(load_golden(items_from))
    gpath = manifest.parent / "golden" / "golden.npz"
    # First with placeholder expectations (the file holds the golden references), then
    # with the scores against a gallery of only those references, as the self-test runs it.
    package.write_golden(gpath, records, splits.demo, inspector.infer(records),
                         refs_per_product=2)
    results = golden_scores(inspector, load_golden(gpath))
    package.write_golden(gpath, records, splits.demo, results, refs_per_product=2)
    data["golden"] = {"file": "golden/golden.npz", "sha256": sha256_file(gpath),
                      "tolerance": 0.02, "items": len(records)}
    write_manifest(manifest, data)
    inspector.close()


_COST_SCRIPT = """
import json, sys, time
from pathlib import Path
import numpy as np
from edge.catalogue import load_catalogue
from edge.config import ModelsConfig
from edge.infer.inspector import ItemInspector
from edge.types import ItemCrop, ItemRecord
cfg = ModelsConfig(manifest=Path(sys.argv[1]), gallery_dir=Path(sys.argv[2]),
                   intra_op_threads=int(sys.argv[3]))
insp = ItemInspector.load(cfg, load_catalogue())
rng = np.random.default_rng(0)
def crop(cam):
    return ItemCrop(cam, rng.integers(0, 255, (insp.size, insp.size, 3), np.uint8),
                    np.full((insp.size, insp.size), 50.0, np.float32),
                    np.ones((insp.size, insp.size), bool), True)
pid = load_catalogue().products[0].product_id
recs = [ItemRecord(i, f"I{i}", pid, 0.0, 0.0, 1e12, (300.0, 200.0, 50.0), (0.0, 0.0),
                   {"top": crop("top"), "angled": crop("angled")}) for i in range(3)]
for _ in range(5):
    insp.infer(recs)
ms = []
for _ in range(40):
    t = time.perf_counter(); insp.infer(recs); ms.append((time.perf_counter() - t) * 1000 / 3)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec.
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"ms_per_item_median": float(np.median(ms)),
                  "ms_per_item_p99": float(np.percentile(ms, 99)), "peak_rss_mb": hwm / 1024}))
"""


def measure_cost(manifest: Path, threads: int) -> dict[str, float]:
    """CPU time per item (two views, batches of 3 items, gallery of the demo products) and
    the peak memory of a process that loads and runs the models."""
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-c", _COST_SCRIPT, str(manifest), tmp,
                              str(threads)], check=True, capture_output=True, text=True)
    cost: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return cost


def capacity_row(m: dict[str, Any]) -> dict[str, Any]:
    u = m["unseen_products"]
    return {"size": m["size"], "val_recall_at_fpr_0.005": m["validation"]["recall_at_fpr_0.005"],
            "fused_auroc": u["fused"]["auroc"],
            "recall_at_fpr_0.005": u["fused"]["recall_at_fpr_0.005"],
            "subtle_recall_at_fpr_0.005":
                u["by_severity"].get("subtle", {}).get("recall_at_fpr_0.005", math.nan),
            **m["cost"]}


#: CPU per item the node can spend on the models and still meet real time (3 items/s and
#: the rest of the pipeline on 2 cores: tools/bench.py).
COST_BUDGET_MS = 60.0


def choose_size(results: dict[int, dict[str, Any]]) -> int:
    """The size with the best validation recall at FPR 0.5 % within the CPU budget; the
    smaller of two within a point. Chosen on validation, never on the test split."""
    fits = [s for s, m in results.items() if m["cost"]["ms_per_item_p99"] <= COST_BUDGET_MS] \
        or [min(results)]
    best = max(results[s]["validation"]["recall_at_fpr_0.005"] for s in fits)
    return min(s for s in fits if results[s]["validation"]["recall_at_fpr_0.005"] >= best - 0.01)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    lap = Laps()
    paths = generate(args.data, args.scale) if args.generate else {
        k: args.data / k for k in (*SPLITS, "demo_references")}
    lap("generate")
    if args.generated_in is not None:
        lap.timings["generate"] = args.generated_in
    splits = Splits(paths)
    lap("load")
    with tempfile.TemporaryDirectory() as tmp:
        if args.measure or args.recalibrate:
            results, folders = {}, {}
            for folder in args.measure or []:
                measured = measure_trained(folder, splits, args, lap)
                results[measured["size"]], folders[measured["size"]] = measured, folder
            for folder in args.recalibrate or []:
                size = int(load_manifest(folder / "manifest.yaml").model("embedding")
                           .preprocessing["size"])
                results[size], folders[size] = calibrate(size, splits, folder, args, lap), folder
        else:
            results = {size: train_size(size, splits, Path(tmp) / str(size), args, lap)
                       for size in (args.sizes if args.capacity else (args.size,))}
            folders = {size: Path(tmp) / str(size) for size in results}
        chosen = choose_size(results) if args.capacity else next(iter(results))
        args.engines.mkdir(parents=True, exist_ok=True)
        if folders[chosen].resolve() != args.engines.resolve():
            shutil.copytree(folders[chosen], args.engines, dirs_exist_ok=True)
    metrics = results[chosen]
    metrics["capacity"] = [capacity_row(results[s]) for s in sorted(results)] \
        if args.capacity else []
    metrics.update(training_seconds=lap.total(), timings_s=lap.timings,
                   threads=args.threads,
                   peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   datasets={k: str(v) for k, v in paths.items()},
                   split_items={k: len(getattr(splits, k).items)
                                for k in ("train", "val", "test")})
    # Measured models keep the version their manifest names; trained ones get --version.
    metrics.setdefault("version", args.version)
    if args.earlier_run is not None:
        earlier = json.loads(args.earlier_run.read_text(encoding="utf-8"))["timings_s"]
        carried = {k: v for k, v in earlier.items()
                   if k.startswith(("features_", "train_head_")) and k not in lap.timings}
        metrics["timings_s"] = {**lap.timings, **carried}
        metrics["training_seconds"] = sum(metrics["timings_s"].values())
        metrics["timings_carried_from"] = sorted(carried)
    if args.note:
        metrics["training_note"] = args.note
    if args.compare_with is not None:
        prev = json.loads(args.compare_with.read_text(encoding="utf-8"))
        metrics["previous_models"] = {k: prev[k] for k in (
            "version", "unseen_products", "demo_catalogue", "real_photos") if k in prev}
    (args.engines / "metrics.json").write_text(
        json.dumps(metrics, indent=2, default=_json_default) + "\n", encoding="utf-8")
    write_cards(args.engines, metrics, args=args)
    print(json.dumps({k: metrics[k] for k in ("unseen_products", "real_photos", "capacity")
                      if k in metrics}, indent=2, default=_json_default))
    return 0


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON: {value!r}")


if __name__ == "__main__":
    raise SystemExit(main())
