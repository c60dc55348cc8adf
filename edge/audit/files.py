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
    replay.npz               each view's height above the belt as the models saw it (float32)
    label.json               added later: what controller feedback said about the item

With the colour and mask PNGs (lossless), `replay.npz` and the item record in the sidecar,
a snapshot holds every input the models had (`read_replay_crops`); the sidecar's `replay`
block (`edge.audit.replay`) names the models, thresholds and gallery they were judged with.
A shadow disagreement (`edge.pipeline.shadow`) adds a `shadow` block to the sidecar. The
sidecar's `kept_for` says why the store took the snapshot (`edge.audit.store.KEPT_FOR`;
absent in snapshots from before it was recorded).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge.audit.overlays import contact_sheet, depth_view, heat_overlay
from edge.durable import write_atomic
from edge.types import ItemCrop, ItemRecord, Scores, Verdict

SIDECAR = "verdict.json"
LABEL = "label.json"
SHEET = "sheet.jpg"
REPLAY_ARRAYS = "replay.npz"
SNAPSHOT_SCHEMA = "conveyor-vision/snapshot@1"
#: Height PNGs store 0.1 mm per unit (as the training sets do).
HEIGHT_UNITS_PER_MM = 10.0
_JPEG = [cv2.IMWRITE_JPEG_QUALITY, 80]


def _num(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def scores_json(scores: Scores | None) -> dict[str, Any] | None:
    """Every score field (new ones included, unchanged: replay compares them all); floats
    as JSON keeps them, exactly."""
    if scores is None:
        return None
    out: dict[str, Any] = {}
    for f in dataclasses.fields(scores):
        value = getattr(scores, f.name)
        out[f.name] = ({k: _num(v) for k, v in value.items()} if isinstance(value, Mapping)
                       else _num(value))
    return out


def verdict_json(verdict: Verdict) -> dict[str, Any]:
    """Every field of the verdict (the anomaly map itself is a file beside it)."""
    amap = verdict.anomaly_map
    return {
        "item_id": verdict.item_id,
        "product_id": verdict.product_id,
        "decision": verdict.decision.value,
        "reasons": [r.value for r in verdict.reasons],
        "scores": scores_json(verdict.scores),
        "threshold_version": verdict.threshold_version,
        "model_versions": dict(verdict.model_versions),
        "findings": [{"type": f.type.value, "probability": _num(f.probability),
                      "box_px": None if f.box_px is None else [int(v) for v in f.box_px]}
                     for f in verdict.findings],
        "captured_ms": _num(verdict.captured_ms),
        "decided_ms": _num(verdict.decided_ms),
        "deadline_ms": _num(verdict.deadline_ms),
        "late": bool(verdict.late),
        "fail_safe": bool(verdict.fail_safe),
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
        "views_missing": list(record.views_missing), "merged": bool(record.merged),
        "unannounced": bool(record.unannounced),
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
    view: dict[str, Any] = {**files, "has_depth": bool(crop.has_depth),
                            "anomaly_map": amap is not None, "truth_damage": None}
    if crop.truth_damage is not None:
        view["truth_damage"] = f"{cam}_truth.png"
        _write_image(out / view["truth_damage"], crop.truth_damage.astype(np.uint8) * 255)
    return view


def write_snapshot(out: Path, record: ItemRecord, verdict: Verdict, saved_ms: float, *,
                   kept_for: str | None = None, replay: Mapping[str, Any] | None = None,
                   shadow: Mapping[str, Any] | None = None) -> None:
    """Write every file of one snapshot into the (new, empty) directory `out`; `kept_for`
    (why it was taken), `replay` (what judged the item, `edge.audit.replay`) and `shadow` (a
    shadow disagreement) go into the sidecar."""
    crops: Mapping[str, ItemCrop] = record.crops
    views = {cam: _write_view(out, cam, crop, verdict) for cam, crop in sorted(crops.items())}
    if verdict.anomaly_map is not None:
        np.save(out / "anomaly_map.npy", np.asarray(verdict.anomaly_map, np.float32))
    if crops:
        heights: dict[str, Any] = {_height_key(cam): np.asarray(crop.height_mm, np.float32)
                                   for cam, crop in crops.items()}
        np.savez_compressed(out / REPLAY_ARRAYS, **heights)
    _write_image(out / SHEET, contact_sheet(verdict, crops, verdict.anomaly_camera))
    sidecar: dict[str, Any] = {
        "schema": SNAPSHOT_SCHEMA,
        "snapshot_id": verdict.snapshot_id,
        "saved_ms": saved_ms,
        "verdict": verdict_json(verdict),
        "item": record_json(record),
        "views": views,
        "sheet": SHEET,
    }
    if kept_for is not None:
        sidecar["kept_for"] = kept_for
    if replay is not None:
        sidecar["replay"] = dict(replay)
    if shadow is not None:
        sidecar["shadow"] = dict(shadow)
    (out / SIDECAR).write_text(json.dumps(sidecar, indent=1, allow_nan=False) + "\n")


def _height_key(camera_id: str) -> str:
    return f"height_mm__{camera_id}"


def _read_image(path: Path, flags: int) -> np.ndarray:
    img = cv2.imread(str(path), flags)
    if img is None:
        raise OSError(f"cannot read {path}")
    return img


def read_replay_crops(snapshot_dir: Path, views: Mapping[str, Any]) -> dict[str, ItemCrop]:
    """The crops exactly as the models saw them: colour and mask from their lossless PNGs,
    height from `replay.npz` (raises OSError or ValueError when a file is missing or
    damaged; KeyError for a snapshot written before the heights were kept)."""
    crops: dict[str, ItemCrop] = {}
    with np.load(snapshot_dir / REPLAY_ARRAYS, allow_pickle=False) as arrays:
        for cam, view in views.items():
            color = _read_image(snapshot_dir / view["color"], cv2.IMREAD_COLOR)
            mask = _read_image(snapshot_dir / view["mask"], cv2.IMREAD_GRAYSCALE) > 0
            crops[cam] = ItemCrop(cam, np.ascontiguousarray(color, np.uint8),
                                  np.asarray(arrays[_height_key(cam)], np.float32), mask,
                                  has_depth=bool(view["has_depth"]))
    return crops


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


def annotate_sidecar(snapshot_dir: Path, key: str, value: Mapping[str, Any]) -> None:
    """Add (or replace) one top-level block of a stored snapshot's sidecar, durably."""
    data = json.loads((snapshot_dir / SIDECAR).read_text())
    data[key] = dict(value)
    write_atomic(snapshot_dir / SIDECAR, json.dumps(data, indent=1, allow_nan=False) + "\n")


def write_label(snapshot_dir: Path, label: Mapping[str, Any]) -> None:
    """Replace the snapshot's label file, durably (see edge.durable)."""
    write_atomic(snapshot_dir / LABEL, json.dumps(dict(label), allow_nan=False) + "\n")
