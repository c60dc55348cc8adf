"""Geometry check: the measured 3D box against the catalogue's nominal dimensions, and the
top face against a plane.

A crushed item is lower than it should be; a broken set (a multipack missing
a unit) has a smaller footprint, or the same footprint with a hole in its
height map (less volume). Each deficit is a fraction of the nominal value.
A dent, a hole or a crushed corner is a depression in the top face: its
depth below the plane fitted to the rest of the face, in millimetres, needs
no catalogue at all and no picture, so printed artwork cannot fake it. The
score is the largest deficit, less the slack nominal items show (from the
manifest, fitted on training data).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import cv2
import numpy as np

from edge.catalogue import Product
from edge.types import ItemCrop

#: Views used for the volume and surface checks, best first (a top-down view sees the
#: whole top face).
VOLUME_VIEWS = ("top",)
#: Heights within this band of the top (90th percentile) seed the plane fit (mm).
_SEED_BAND_MM = 15.0
#: A pixel belongs to the face when it is within max(3 sigma, this) of the plane (mm).
_INLIER_FLOOR_MM = 4.0
#: Gaussian smoothing before the deepest point is taken, as a share of the crop's size:
#: stereo noise is independent per pixel, a dent spans many.
_SMOOTH_SHARE = 1.5 / 192
#: The face's rim is left out (share of the crop's size): edges mix face and side.
_RIM_SHARE = 4.0 / 192
_MIN_FACE_PIXELS = 50
#: A depression this deep (share of the nominal height) goes down to the belt: a unit is
#: missing; a dent or a hole in a multipack's top stops short of it.
_GAP_SHARE = 0.65
#: Packaging whose top is a rigid plane; a polybag's or a padded mailer's top bulges, and
#: its bulge is no dent.
RIGID_PACKAGING = ("box", "multipack")


@dataclass(frozen=True, slots=True)
class GeometryResult:
    score: float
    height_deficit: float
    footprint_deficit: float
    fill_deficit: float
    surface_deficit: float = 0.0  # deepest top-face depression / the manifest's full scale
    dent_mm: float | None = None  # that depression in millimetres (None: not measured)
    #: The evidence of a missing unit: the box deficits, and a depression down to the belt
    #: (a dent or a hole in a multipack is damage of its own type, not a broken set).
    set_score: float = 0.0


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


def _fit_plane(xs: np.ndarray, ys: np.ndarray, z: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, float] | None:
    """Least squares z = a x + b y + c on the top's heights, refitted on its own inliers
    (sides, neighbours and the depression itself fall out); (coefficients, inliers, sigma)."""
    inliers = np.abs(z - np.percentile(z, 90)) < _SEED_BAND_MM
    coef = np.zeros(3)
    sigma = 0.0
    design = np.column_stack([xs, ys, np.ones_like(xs)])
    for _ in range(4):
        if inliers.sum() < _MIN_FACE_PIXELS:
            return None
        coef = np.linalg.lstsq(design[inliers], z[inliers], rcond=None)[0]
        residual = z - design @ coef
        sigma = 1.4826 * float(np.median(np.abs(residual[inliers])))
        inliers = np.abs(residual) < max(3.0 * sigma, _INLIER_FLOOR_MM)
    return coef, inliers, sigma


def surface_dent_mm(crop: ItemCrop) -> float | None:
    """Depth (mm) of the deepest depression in the item's top face below the plane fitted to
    the face, after smoothing away pixel noise; None without enough depth.

    The face is the convex hull of the largest connected set of plane inliers, less its rim,
    within the item's mask: a dent or a hole inside it, or a crushed edge between its
    intact corners, lies below the plane; the sides a perspective view shows, the belt and
    touching neighbours lie outside it. Pixels without depth (dropouts) are left out."""
    if not crop.has_depth:
        return None
    h = crop.height_mm
    valid = crop.mask & (h > 0)
    ys, xs = np.nonzero(valid)
    if ys.size < _MIN_FACE_PIXELS:
        return None
    fit = _fit_plane(xs.astype(np.float64), ys.astype(np.float64), h[ys, xs].astype(np.float64))
    if fit is None:
        return None
    coef, inliers, _ = fit
    seeds = np.zeros(h.shape, np.uint8)
    seeds[ys[inliers], xs[inliers]] = 1
    on_plane = cv2.morphologyEx(seeds, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(on_plane)
    if n < 2:
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    hull = np.zeros(h.shape, np.uint8)
    cv2.fillConvexPoly(hull, cv2.convexHull(cv2.findNonZero((labels == largest).astype(
        np.uint8))), 1)
    size = max(h.shape)
    rim = max(1, round(_RIM_SHARE * size))
    face = (cv2.erode(hull, np.ones((2 * rim + 1, 2 * rim + 1), np.uint8)) > 0) & crop.mask
    measured = face & (h > 0)
    if measured.sum() < _MIN_FACE_PIXELS:
        return None
    gx = np.arange(h.shape[1], dtype=np.float32)[None, :]
    gy = np.arange(h.shape[0], dtype=np.float32)[:, None]
    plane = np.float32(coef[0]) * gx + np.float32(coef[1]) * gy + np.float32(coef[2])
    weight = measured.astype(np.float32)
    below = np.where(measured, plane - h, 0.0).astype(np.float32)
    sigma_px = _SMOOTH_SHARE * size
    num = cv2.GaussianBlur(below, (0, 0), sigma_px)
    den = cv2.GaussianBlur(weight, (0, 0), sigma_px)
    # Only where a fair share of the smoothing window had depth: a lone pixel is no dent.
    supported = face & (den > 0.3)
    if not supported.any():
        return None
    return max(0.0, float((num[supported] / den[supported]).max()))


def geometry_check(box_mm: tuple[float, float, float], product: Product,
                   crops: Mapping[str, ItemCrop], expected_fill: Mapping[str, float],
                   slack: float = 0.0, surface_full_mm: float | None = None,
                   surface_packaging: Collection[str] = RIGID_PACKAGING
                   ) -> GeometryResult | None:
    """Deficits of the measured box against `product`; None when no view has depth.
    `surface_full_mm`: the top-face depression that counts as a full deficit (1.0); None
    leaves the surface out (models calibrated before it existed). Only products whose
    packaging is in `surface_packaging` have their top face measured."""
    if not any(c.has_depth for c in crops.values()):
        return None
    nom_l, nom_w, nom_h = product.dims_mm
    length, width = max(box_mm[0], box_mm[1]), min(box_mm[0], box_mm[1])
    height_def = max(0.0, (nom_h - box_mm[2]) / nom_h)
    foot_def = max(0.0, 1.0 - (length * width) / (nom_l * nom_w))
    fill_def = 0.0
    surface_def = 0.0
    dent = None
    for cam in VOLUME_VIEWS:
        crop = crops.get(cam)
        ratio = None if crop is None else fill_ratio(crop)
        if ratio is not None:
            want = float(expected_fill.get(product.packaging, 0.9))
            fill_def = max(0.0, (want - ratio) / max(want, 1e-3))
        if surface_full_mm is not None and crop is not None \
                and product.packaging in surface_packaging:
            dent = surface_dent_mm(crop)
            if dent is not None:
                surface_def = dent / surface_full_mm
    score = max(0.0, max(height_def, foot_def, fill_def, surface_def) - slack)
    gap = 1.0 if dent is not None and dent >= _GAP_SHARE * nom_h else 0.0
    set_score = max(0.0, max(height_def, foot_def, fill_def, gap) - slack)
    return GeometryResult(score, height_def, foot_def, fill_def, surface_def, dent, set_score)
