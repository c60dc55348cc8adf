"""What one audit snapshot is on disk: image files and the JSON sidecar.

A snapshot is a directory named by its ID::

    verdict.json             the full verdict, the item record and the file list
    sheet.jpg                one row per camera: colour | height | overlay (for people)
    <cam>_overlay.jpg        anomaly heat map + damage boxes over the crop (2x)
    <cam>_depth.jpg          height above the belt, colour-mapped
    <cam>_color.png          the model crop, lossless (for retraining)
    <cam>_height.png         uint16 height, 0.1 mm per unit (for retraining)
    <cam>_mask.png           the item's pixels
    <cam>_truth.png          synthetic runs: ground-truth damage pixels
    anomaly_map.npy          the raw anomaly map (float32, crop pixels of `anomaly_camera`)
    label.json               added later: what controller feedback said about the item
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge.audit.overlays import contact_sheet, depth_view, heat_overlay
from edge.durable import fsync_dir, write_atomic
from edge.types import ItemCrop, ItemRecord, Verdict

SIDECAR = "verdict.json"
LABEL = "label.json"
SHEET = "sheet.jpg"
SNAPSHOT_SCHEMA = "conveyor-vision/snapshot@1"
#: Height PNGs store 0.1 mm per unit (as the training sets do).
HEIGHT_UNITS_PER_MM = 10.0
_JPEG = [cv2.IMWRITE_JPEG_QUALITY, 80]


def _num(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def verdict_json(verdict: Verdict) -> dict[str, Any]:
    """Every field of the verdict (the anomaly map itself is a file beside it)."""
    s = verdict.scores
    amap = verdict.anomaly_map
    return {
        "item_id": verdict.item_id,
        "product_id": verdict.product_id,
        "decision": verdict.decision.value,
        "reasons": [r.value for r in verdict.reasons],
        "scores": None if s is None else {
            "damage": _num(s.damage), "anomaly": _num(s.anomaly), "geometry": _num(s.geometry),
            "fused": _num(s.fused), "per_type": {k: _num(v) for k, v in s.per_type.items()}},
        "threshold_version": verdict.threshold_version,
        "model_versions": dict(verdict.model_versions),
        "findings": [{"type": f.type.value, "probability": _num(f.probability),
                      "box_px": None if f.box_px is None else [int(v) for v in f.box_px]}
                     for f in verdict.findings],
        "captured_ms": _num(verdict.captured_ms),
        "decided_ms": _num(verdict.decided_ms),
        "deadline_ms": _num(verdict.deadline_ms),
        "late": verdict.late,
        "fail_safe": verdict.fail_safe,
        "snapshot_id": verdict.snapshot_id,
        "anomaly_camera": verdict.anomaly_camera,
        "anomaly_map": None if amap is None else {
            "file": "anomaly_map.npy", "shape": list(amap.shape),
            "min": _num(float(np.nanmin(amap))), "max": _num(float(np.nanmax(amap)))},
    }


def record_json(record: ItemRecord) -> dict[str, Any]:
    """The item as the node saw it (synthetic ground truth included when present)."""
    t = record.truth
    return {
        "track_id": record.track_id, "item_id": record.item_id,
        "product_id": record.product_id, "first_seen_ms": _num(record.first_seen_ms),
        "captured_ms": _num(record.captured_ms), "deadline_ms": _num(record.deadline_ms),
        "box_mm": [_num(v) for v in record.box_mm],
        "centre_mm": [_num(v) for v in record.centre_mm],
        "views_missing": list(record.views_missing), "merged": record.merged,
        "unannounced": record.unannounced,
        "truth": None if t is None else {
            "item_id": t.item_id, "product_id": t.product_id,
            "damage": None if t.damage is None else t.damage.value,
            "box_mm": list(t.box_mm), "confounder": t.confounder},
    }


def _write_image(path: Path, img: np.ndarray) -> None:
    params = _JPEG if path.suffix == ".jpg" else []
    ok, buf = cv2.imencode(path.suffix, img, params)
    if not ok:
        raise OSError(f"could not encode {path.name}")
    path.write_bytes(buf.tobytes())


def _write_view(out: Path, cam: str, crop: ItemCrop, verdict: Verdict) -> dict[str, Any]:
    amap = verdict.anomaly_map if cam == verdict.anomaly_camera else None
    files = {"color": f"{cam}_color.png", "height": f"{cam}_height.png",
             "mask": f"{cam}_mask.png", "depth": f"{cam}_depth.jpg",
             "overlay": f"{cam}_overlay.jpg"}
    _write_image(out / files["color"], crop.color)
    height = np.nan_to_num(crop.height_mm, nan=0.0) * HEIGHT_UNITS_PER_MM
    _write_image(out / files["height"], np.clip(height, 0, 65535).astype(np.uint16))
    _write_image(out / files["mask"], crop.mask.astype(np.uint8) * 255)
    _write_image(out / files["depth"], depth_view(crop.height_mm, crop.has_depth, scale=1))
    _write_image(out / files["overlay"], heat_overlay(crop.color, amap, verdict.findings))
    view: dict[str, Any] = {**files, "has_depth": crop.has_depth,
                            "anomaly_map": amap is not None, "truth_damage": None}
    if crop.truth_damage is not None:
        view["truth_damage"] = f"{cam}_truth.png"
        _write_image(out / view["truth_damage"], crop.truth_damage.astype(np.uint8) * 255)
    return view


def write_snapshot(out: Path, record: ItemRecord, verdict: Verdict, saved_ms: float) -> None:
    """Write every file of one snapshot into the (new, empty) directory `out`."""
    crops: Mapping[str, ItemCrop] = record.crops
    views = {cam: _write_view(out, cam, crop, verdict) for cam, crop in sorted(crops.items())}
    if verdict.anomaly_map is not None:
        np.save(out / "anomaly_map.npy", np.asarray(verdict.anomaly_map, np.float32))
    _write_image(out / SHEET, contact_sheet(verdict, crops, verdict.anomaly_camera))
    sidecar = {
        "schema": SNAPSHOT_SCHEMA,
        "snapshot_id": verdict.snapshot_id,
        "saved_ms": saved_ms,
        "verdict": verdict_json(verdict),
        "item": record_json(record),
        "views": views,
        "sheet": SHEET,
    }
    (out / SIDECAR).write_text(json.dumps(sidecar, indent=1, allow_nan=False) + "\n")


def disk_usage(path: Path) -> int:
    """Bytes a file or directory tree occupies on disk (allocated blocks, like du)."""
    if path.is_file():
        st = path.stat()
        return max(st.st_size, st.st_blocks * 512)
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                st = os.stat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            total += max(st.st_size, st.st_blocks * 512)
    return total


def read_sidecar(snapshot_dir: Path) -> dict[str, Any]:
    """The sidecar, with the label (if any) under ``label``. A label file that cannot be
    read counts as no label: the audit record stays visible."""
    data: dict[str, Any] = json.loads((snapshot_dir / SIDECAR).read_text())
    label_path = snapshot_dir / LABEL
    try:
        data["label"] = json.loads(label_path.read_text()) if label_path.exists() else None
    except (OSError, ValueError):
        data["label"] = None
    return data


def write_label(snapshot_dir: Path, label: Mapping[str, Any]) -> None:
    """Replace the snapshot's label file, durably (see edge.durable)."""
    write_atomic(snapshot_dir / LABEL, json.dumps(dict(label), allow_nan=False) + "\n")


def sync_tree(folder: Path) -> None:
    """fsync every file in `folder` and the folder itself: after a power cut a snapshot that
    was renamed into place holds what was written, not empty files. (The files are written
    in place into a new folder that is renamed whole, so edge.durable cannot write them.)"""
    for path in folder.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(folder)
