"""Train, export, calibrate and evaluate the default models; writes everything into `engines/`.

    python tools/train_models.py --generate          # synthetic train/val/test, then train
    python tools/train_models.py --train D1 --val D2 --test D3

Three synthetic datasets with separate seeds: train (the damage head),
validation (fusion weights, normalization, thresholds), test (the metrics in
the model cards; neither training nor fitting sees it). CPU only, torch
2.13; the frozen backbone's features are computed once, then a small head
is trained on them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parent.parent

from edge.catalogue import load_catalogue  # noqa: E402
from edge.config import ModelsConfig  # noqa: E402
from edge.infer.dataset import Dataset, load_dataset  # noqa: E402
from edge.infer.fit import fit_fusion, fit_thresholds, thresholds_to_mapping  # noqa: E402
from edge.infer.fusion import Fusion, Thresholds  # noqa: E402
from edge.infer.golden import golden_scores, load_golden  # noqa: E402
from edge.infer.inspector import ItemInspector  # noqa: E402
from edge.infer.manifest import sha256_file, write_manifest  # noqa: E402
from edge.infer.size_check import fill_ratio  # noqa: E402
from edge.training import package  # noqa: E402
from edge.training.cards import write_cards  # noqa: E402
from edge.training.effnet import Trunk, load_lite0  # noqa: E402
from edge.training.features import build  # noqa: E402
from edge.training.fit_head import train_head  # noqa: E402
from edge.training.heads import DamageHead, export_damage, export_embedding  # noqa: E402

SIZE = 128
SPLITS = {"train": (11, 2400, 0.5), "val": (22, 1500, 0.3), "test": (33, 2000, 0.3)}


def generate(root: Path, references: int) -> dict[str, Path]:
    out = {}
    for split, (seed, items, rate) in SPLITS.items():
        path = root / split
        if not (path / "index.jsonl").exists():
            subprocess.run([sys.executable, "-m", "edge", "synth", "dataset", "--out",
                            str(path), "--items", str(items), "--seed", str(seed),
                            "--damage-rate", str(rate), "--references", str(references)],
                           check=True)
        out[split] = path
    return out


def expected_fill(train: Dataset) -> dict[str, float]:
    """Median fill ratio of nominal items' top views, per packaging."""
    catalogue = load_catalogue()
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
        self.started = time.monotonic()
        self.timings: dict[str, float] = {}

    def __call__(self, name: str) -> None:
        self.timings[name] = round(time.monotonic() - self.started - sum(self.timings.values()),
                                   1)
        print(f"[{name}] {self.timings[name]} s", flush=True)

    def total(self) -> float:
        return round(time.monotonic() - self.started, 1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--train", type=Path)
    ap.add_argument("--val", type=Path)
    ap.add_argument("--test", type=Path)
    ap.add_argument("--generate", action="store_true", help="write the datasets into --data")
    ap.add_argument("--data", type=Path, default=Path("/tmp/conveyor-vision-data"))
    ap.add_argument("--engines", type=Path, default=REPO / "engines")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target-fpr", type=float, default=0.005)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--version", default=time.strftime("1.0.0+%Y%m%d", time.gmtime()))
    args = ap.parse_args(argv)
    if not args.generate and None in (args.train, args.val, args.test):
        ap.error("give --train, --val and --test, or --generate")
    return args


def export(args: argparse.Namespace, trunk: Trunk, head: DamageHead,
           train: Dataset) -> dict[str, Any]:
    """ONNX files, head weights, gallery seed; returns the manifest sections fixed from now on."""
    eng = args.engines
    for sub in ("embedding", "damage", "golden"):
        (eng / sub).mkdir(parents=True, exist_ok=True)
    export_embedding(trunk, eng / "embedding" / "embedding.onnx", SIZE)
    export_damage(head, eng / "damage" / "damage.onnx", SIZE)
    torch.save(head.state_dict(), eng / "damage" / "damage_head.pt")
    seed_info = package.write_gallery_seed(eng / "gallery_seed.npz", train, per_product=4)
    fixed: dict[str, Any] = {"geometry": {"expected_fill": expected_fill(train), "slack": 0.0},
             "extra": {"gallery_seed": seed_info}}
    placeholder = {"version": "uncalibrated", "target_fpr": args.target_fpr,
                   "fused": dict.fromkeys(package.COMBOS, 0.5), "components": {}}
    write_manifest(eng / "manifest.yaml", package.manifest_data(
        eng, args.version, SIZE, fusion=package.neutral_fusion(), thresholds=placeholder, **fixed))
    return fixed


def calibrate(args: argparse.Namespace, cfg: ModelsConfig,
              fixed: dict[str, Any]) -> tuple[Fusion, Thresholds, dict[str, Any], int]:
    """Fusion weights and thresholds on the validation split, written into the manifest."""
    inspector = ItemInspector.load(cfg, load_catalogue())
    val = load_dataset(args.val)
    table = package.score(inspector, val.items)
    fusion = fit_fusion(table)
    thresholds = fit_thresholds(table, fusion, args.target_fpr, version=args.version)
    data = package.manifest_data(
        args.engines, args.version, SIZE, fusion=fusion,
        thresholds=thresholds_to_mapping(thresholds, str(args.val.name), len(val.items)),
        **fixed)
    write_manifest(cfg.manifest, data)
    return fusion, thresholds, data, len(val.items)


def write_golden_set(inspector: ItemInspector, test: Dataset, train: Dataset,
                     data: dict[str, Any], manifest: Path) -> None:
    """Golden items from the test split, expectations as the self-test computes them."""
    records = package.pick_golden(test.items)
    gpath = manifest.parent / "golden" / "golden.npz"
    # First with placeholder expectations (the file holds the golden references), then
    # with the scores against a gallery of only those references, as the self-test runs it.
    package.write_golden(gpath, records, train, inspector.infer(records), refs_per_product=2)
    results = golden_scores(inspector, load_golden(gpath))
    package.write_golden(gpath, records, train, results, refs_per_product=2)
    data["golden"] = {"file": "golden/golden.npz", "sha256": sha256_file(gpath),
                      "tolerance": 0.02, "items": len(records)}
    write_manifest(manifest, data)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    lap = Laps()
    if args.generate:
        paths = generate(args.data, references=4)
        args.train, args.val, args.test = paths["train"], paths["val"], paths["test"]
        lap("generate")
    train = load_dataset(args.train)
    lap("load_train")
    trunk = Trunk(load_lite0()).eval()
    tensors = build(train, trunk, SIZE)
    lap("backbone_features")
    head = train_head(tensors, epochs=args.epochs, seed=args.seed)
    del tensors
    lap("train_head")
    fixed = export(args, trunk, head, train)
    lap("export")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ModelsConfig(manifest=args.engines / "manifest.yaml",
                           gallery_dir=Path(tmp) / "gallery", intra_op_threads=args.threads)
        fusion, thresholds, data, n_val = calibrate(args, cfg, fixed)
        lap("calibrate_val")
        inspector = ItemInspector.load(cfg, load_catalogue())
        test = load_dataset(args.test)
        metrics = package.evaluate(package.score(inspector, test.items), fusion, thresholds)
        lap("evaluate_test")
        write_golden_set(inspector, test, train, data, cfg.manifest)
    lap("golden")
    metrics.update(training_seconds=lap.total(), timings_s=lap.timings, version=args.version,
                   datasets={k: str(getattr(args, k)) for k in ("train", "val", "test")})
    (args.engines / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n",
                                               encoding="utf-8")
    write_cards(args.engines, metrics, data, n_train=len(train.items), n_val=n_val, args=args)
    print(json.dumps({k: metrics[k] for k in ("fused", "per_type_recall", "broken_set_recall",
                                              "confounder_fpr", "test_items")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
