"""Geometry check: the measured 3D box against the catalogue's nominal dimensions.

A crushed item is lower than it should be; a broken set (a multipack missing
a unit) has a smaller footprint, or the same footprint with a hole in its
height map (less volume). Each deficit is a fraction of the nominal value;
the score is the largest, less the slack nominal items show (from the
manifest, fitted on training data).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edge.catalogue import Product
from edge.types import ItemCrop

#: Views used for the volume check, best first (a top-down view sees the whole footprint).
VOLUME_VIEWS = ("top",)


@dataclass(frozen=True, slots=True)
class GeometryResult:
    score: float
    height_deficit: float
    footprint_deficit: float
    fill_deficit: float


def fill_ratio(crop: ItemCrop) -> float | None:
    """Volume under the height map / (footprint rectangle x its high percentile height)."""
    if not crop.has_depth or not crop.mask.any():
        return None
    ys, xs = np.nonzero(crop.mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    h = crop.height_mm[y0:y1, x0:x1]
    inside = h[crop.mask[y0:y1, x0:x1]]
    top = float(np.percentile(inside, 95)) if inside.size else 0.0
    if top <= 0:
        return None
    return float(np.clip(h, 0, top).sum() / (h.size * top))


def geometry_check(box_mm: tuple[float, float, float], product: Product,
                   crops: Mapping[str, ItemCrop], expected_fill: Mapping[str, float],
                   slack: float = 0.0) -> GeometryResult | None:
    """Deficits of the measured box against `product`; None when no view has depth."""
    if not any(c.has_depth for c in crops.values()):
        return None
    nom_l, nom_w, nom_h = product.dims_mm
    length, width = max(box_mm[0], box_mm[1]), min(box_mm[0], box_mm[1])
    height_def = max(0.0, (nom_h - box_mm[2]) / nom_h)
    foot_def = max(0.0, 1.0 - (length * width) / (nom_l * nom_w))
    fill_def = 0.0
    for cam in VOLUME_VIEWS:
        crop = crops.get(cam)
        ratio = None if crop is None else fill_ratio(crop)
        if ratio is not None:
            want = float(expected_fill.get(product.packaging, 0.9))
            fill_def = max(0.0, (want - ratio) / max(want, 1e-3))
    score = max(0.0, max(height_def, foot_def, fill_def) - slack)
    return GeometryResult(score, height_def, foot_def, fill_def)
