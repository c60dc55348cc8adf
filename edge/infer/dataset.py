"""Reader for synthetic datasets written by `edge-node synth dataset`.

`DIR/index.jsonl` has one JSON object per crop; crops of one item share an
`item_id`. Items become `ItemRecord`s (with `ItemTruth`: damage type, severity
and size, confounder print), reference views (role "reference") become
per-product crop lists for the gallery. `DIR/catalogue.yaml` holds the products
the dataset was rendered from.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge.catalogue import Catalogue, load_catalogue
from edge.config import ConfigError
from edge.types import DamageType, ItemCrop, ItemRecord, ItemTruth, box3

#: The height PNGs store tenths of a millimetre.
HEIGHT_UNIT_MM = 0.1


class DatasetError(ValueError):
    """A dataset directory or one of its files cannot be read."""


_SEVERITIES = ("subtle", "moderate", "severe")


@dataclass(frozen=True, slots=True)
class Dataset:
    root: Path
    items: tuple[ItemRecord, ...]
    references: dict[str, dict[str, list[ItemCrop]]]  # product -> camera -> crops
    catalogue: Catalogue  # the products the dataset was rendered from
    split: str | None = None  # train, val or test; None: not a benchmark split


def _image(root: Path, rel: str, flags: int) -> np.ndarray:
    img = cv2.imread(str(root / rel), flags)
    if img is None:
        raise DatasetError(f"{root / rel}: missing or not an image")
    return img


def read_crop(root: Path, row: dict[str, Any]) -> ItemCrop:
    color = _image(root, row["rgb"], cv2.IMREAD_COLOR)
    height = _image(root, row["height"], cv2.IMREAD_UNCHANGED).astype(np.float32) * HEIGHT_UNIT_MM
    mask = _image(root, row["mask"], cv2.IMREAD_GRAYSCALE) > 0
    damage = None
    if row.get("damage_mask"):
        damage = _image(root, row["damage_mask"], cv2.IMREAD_GRAYSCALE) > 0
    return ItemCrop(camera_id=str(row["camera"]), color=color, height_mm=height, mask=mask,
                    has_depth=bool((height > 0).any()), truth_damage=damage)


def _rows(root: Path) -> Iterator[dict[str, Any]]:
    index = root / "index.jsonl"
    try:
        lines = index.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DatasetError(f"{index}: cannot be read ({exc})") from None
    for n, line in enumerate(lines, start=1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{index}:{n}: not JSON ({exc})") from None


def _record(n: int, rows: list[dict[str, Any]], crops: dict[str, ItemCrop]) -> ItemRecord:
    first = rows[0]
    # The node measures the box from the top-down view when it has one.
    box_row = next((r for r in rows if r["camera"] == "top"), first)
    box = box3(box_row["measured_box_mm"])
    damage = DamageType(first["damage"]) if first.get("damage") else None
    severity = first.get("severity")
    if severity not in (None, *_SEVERITIES):
        raise DatasetError(f"item {first['item_id']}: severity {severity!r} is not one of "
                           f"{_SEVERITIES}")
    truth = ItemTruth(str(first["item_id"]), str(first["product_id"]), damage,
                      box3(first["box_mm"]),
                      bool(first.get("confounder", False)),
                      severity=severity,
                      damage_size_mm=_optional_mm(first.get("damage_size_mm")),
                      damage_depth_mm=_optional_mm(first.get("damage_depth_mm")),
                      print_style=first.get("print_style"))
    return ItemRecord(track_id=n, item_id=str(first["item_id"]),
                      product_id=str(first["product_id"]), first_seen_ms=0.0, captured_ms=0.0,
                      deadline_ms=1e12, box_mm=box, centre_mm=(0.0, 0.0),
                      crops=crops, truth=truth)


def _optional_mm(value: Any) -> float | None:
    return None if value is None else float(value)


def load_dataset(root: Path, *, limit: int | None = None) -> Dataset:
    """Items (first `limit`), reference views and catalogue of the dataset in `root`."""
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    refs: dict[str, dict[str, list[ItemCrop]]] = defaultdict(lambda: defaultdict(list))
    try:
        catalogue = load_catalogue(root / "catalogue.yaml")
    except ConfigError as exc:
        raise DatasetError(f"{root / 'catalogue.yaml'}: {exc}") from None
    splits: set[str] = set()
    for row in _rows(root):
        if row.get("split"):
            splits.add(str(row["split"]))
        if row.get("role") == "reference":
            refs[str(row["product_id"])][str(row["camera"])].append(read_crop(root, row))
        elif limit is None or len(grouped) < limit or row["item_id"] in grouped:
            grouped[str(row["item_id"])].append(row)
    items = tuple(
        _record(n, rows, {str(r["camera"]): read_crop(root, r) for r in rows})
        for n, rows in enumerate(grouped.values()))
    if len(splits) > 1:
        raise DatasetError(f"{root}: rows of several splits {sorted(splits)}")
    return Dataset(root, items, {p: dict(c) for p, c in refs.items()}, catalogue,
                   next(iter(splits), None))
