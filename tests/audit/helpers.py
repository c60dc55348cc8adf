"""Items from the synthetic conveyor, cut out as the node does, for the snapshot tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np

from edge.audit.store import SnapshotStore
from edge.catalogue import load_catalogue
from edge.config import StorageConfig, load_config
from edge.perception.segmentation import ItemSegmenter
from edge.sim.conveyor import SyntheticConveyor
from edge.sim.dataset import item_views
from edge.types import (
    DamageFinding,
    DamageType,
    Decision,
    F32Array,
    ItemRecord,
    Reason,
    Scores,
    Verdict,
)


def synthetic_records(count: int, *, damage_rate: float, seed: int = 3) -> list[ItemRecord]:
    """`count` items with crops from every camera (ground-truth damage masks included)."""
    cfg = load_config(None)
    syn = dataclasses.replace(cfg.synthetic, seed=seed, damage_rate=damage_rate,
                              touching_rate=0.0, confounder_rate=0.0)
    world = SyntheticConveyor(syn, cfg.belt, cfg.cameras, load_catalogue(), start_ms=0.0)
    planes = {c: ItemSegmenter(c, world.intrinsics(c), world.camera_pose(c), cfg.items)
              for c in world.camera_ids}
    out: list[ItemRecord] = []
    t = 0.0
    while len(out) < count:
        t += 5000.0
        for item in world.schedule.items_until(t):
            if item.induct_ms < t - 5000.0 or len(out) >= count:
                continue
            views = list(item_views(world, item, cfg.items.crop_size, planes))
            if not views:
                continue
            crops = {v.crop.camera_id: v.crop for v in views}
            out.append(ItemRecord(
                track_id=item.index, item_id=item.item_id, product_id=item.product.product_id,
                first_seen_ms=item.induct_ms, captured_ms=item.induct_ms + 1000.0,
                deadline_ms=item.induct_ms + 5000.0, box_mm=views[0].measured_box_mm,
                centre_mm=(0.0, item.y_mm), crops=crops, truth=item.truth))
    return out


def blob_map(mask: np.ndarray, cells: int = 16) -> F32Array:
    """A patch-distance-like map (cells x cells, upsampled to the crop) hot where `mask` is."""
    size = mask.shape[0]
    coarse = cv2.resize(mask.astype(np.float32), (cells, cells), interpolation=cv2.INTER_AREA)
    coarse = 0.3 + coarse + 0.02 * np.random.default_rng(0).random((cells, cells))
    up = cv2.resize(coarse.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
    return np.asarray(up, np.float32)


def verdict_for(record: ItemRecord, decision: Decision, *, anomaly_map: F32Array | None = None,
                anomaly_camera: str | None = None,
                box: tuple[int, int, int, int] | None = None) -> Verdict:
    """A verdict as `edge.verdicts.policy` builds it, with the given map and one finding."""
    findings = (DamageFinding(DamageType.CRUSH, 0.91, box),) if box is not None else ()
    return Verdict(
        item_id=record.item_id, product_id=record.product_id, decision=decision,
        reasons=(Reason.DAMAGE, Reason.ANOMALY) if decision is Decision.SIDELINE else (),
        scores=Scores(0.91, 3.2, None, 0.95, {"crush": 0.91}), threshold_version="t1",
        model_versions={"damage": "d1", "embedding": "e1"}, findings=findings,
        captured_ms=record.captured_ms, decided_ms=record.captured_ms + 80.0,
        deadline_ms=record.deadline_ms, anomaly_map=anomaly_map, anomaly_camera=anomaly_camera)


def make_store(root: Path, **storage: float) -> SnapshotStore:
    cfg = dataclasses.replace(StorageConfig(state_dir=root), snapshots_min_free_mb=0.0,
                              **storage)  # type: ignore[arg-type]
    return SnapshotStore(root / "snapshots", cfg)
