"""One photograph (any size) -> a rectified item record, for `edge-node inspect`.

The item is found from the height map when there is one (pixels above the
belt), otherwise from colour against the background estimated at the image
border; when nothing item-like stands out the whole image is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edge.catalogue import Product
from edge.perception.crops import rectify_item
from edge.types import BoolArray, F32Array, ItemRecord, U8Array

MIN_HEIGHT_MM = 12.0
#: A found item must cover this share of the image (else the whole image is used).
MIN_AREA, MAX_AREA = 0.03, 0.97


class PhotoError(ValueError):
    """A photograph or height map that cannot be read or does not fit together."""


@dataclass(frozen=True, slots=True)
class Photo:
    record: ItemRecord
    item_found: bool
    has_depth: bool
    notes: tuple[str, ...]


def _largest(mask: BoolArray) -> BoolArray | None:
    m = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, np.ones((5, 5), np.uint8))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(m)
    if n <= 1:
        return None
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    out = labels == best
    share = float(out.mean())
    return out if MIN_AREA <= share <= MAX_AREA else None


def find_item(color: U8Array, height_mm: F32Array | None) -> BoolArray | None:
    if height_mm is not None:
        found = _largest(np.nan_to_num(height_mm, nan=0.0) > MIN_HEIGHT_MM)
        if found is not None:
            return found
    border = np.concatenate([color[0], color[-1], color[:, 0], color[:, -1]]).astype(np.float32)
    background = np.median(border, axis=0)
    dist = np.linalg.norm(color.astype(np.float32) - background, axis=2)
    dist8 = np.clip(dist, 0, 255).astype(np.uint8)
    _, fg = cv2.threshold(dist8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, np.ones((7, 7), np.uint8))
    return _largest(fg > 0)


def read_height(path: Path, shape: tuple[int, int], unit_mm: float) -> F32Array:
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None or raw.ndim != 2:
        raise PhotoError(f"{path}: not a single-channel height PNG")
    height = raw.astype(np.float32) * np.float32(unit_mm)
    if height.shape != shape:
        height = np.asarray(cv2.resize(height, (shape[1], shape[0]),
                                       interpolation=cv2.INTER_NEAREST), np.float32)
    height[raw == 0 if raw.shape == shape else height == 0] = np.nan
    return height


def load_photo(rgb: Path, depth: Path | None, *, product: Product | None,
               product_id: str | None, size: int, depth_unit_mm: float = 0.1) -> Photo:
    raw = cv2.imread(str(rgb), cv2.IMREAD_COLOR)
    if raw is None:
        raise PhotoError(f"{rgb}: missing or not an image")
    color = np.asarray(raw, np.uint8)
    notes = []
    height = None if depth is None else read_height(depth, color.shape[:2], depth_unit_mm)
    mask = find_item(color, height)
    found = mask is not None
    if mask is None:
        mask = np.ones(color.shape[:2], bool)
        notes.append("no item found: the whole image is used")
    if height is None:
        notes.append("no depth: classifier on RGB only, geometry check skipped")
        height = np.full(color.shape[:2], np.nan, np.float32)
    crop = rectify_item("top", color, height, mask, size)
    box = _box(crop.height_mm, crop.mask, product) if crop.has_depth else (0.0, 0.0, 0.0)
    if crop.has_depth and product is not None:
        notes.append("footprint taken as nominal (a photo has no mm scale); height measured")
    record = ItemRecord(track_id=0, item_id=rgb.stem, product_id=product_id, first_seen_ms=0.0,
                        captured_ms=0.0, deadline_ms=float("inf"), box_mm=box,
                        centre_mm=(0.0, 0.0), crops={"top": crop})
    return Photo(record, found, crop.has_depth, tuple(notes))


def _box(height_mm: F32Array, mask: BoolArray, product: Product | None
         ) -> tuple[float, float, float]:
    inside = height_mm[mask & (height_mm > 0)]
    top = float(np.percentile(inside, 90)) if inside.size else 0.0
    if product is None:
        return (0.0, 0.0, top)
    return (product.dims_mm[0], product.dims_mm[1], top)
