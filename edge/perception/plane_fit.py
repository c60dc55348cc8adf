"""Robust belt-plane fitting on depth images: the math the belt check and `edge-calibrate belt`
share.

Planes are written ``n . p + d = 0`` in camera coordinates (mm) with the unit
normal `n` pointing towards the camera (up, away from the belt), so `d` is
the camera's height above the plane and ``n . p + d`` is a point's height.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from edge.capture.calibration import InspectionRegion
from edge.types import BoolArray, FloatArray, Intrinsics, Pose, U16Array

_RANSAC_ITERATIONS = 200

_RANSAC_SAMPLE = 20_000

class BeltFitError(ValueError):
    """The depth does not show a belt plane that can be fitted; says why and what to do."""

@dataclass(frozen=True, slots=True)
class Plane:
    normal: FloatArray  # (3,) unit, towards the camera
    offset_mm: float  # d in n . p + d = 0; the camera's height above the plane

    def heights(self, points: FloatArray) -> FloatArray:
        return np.asarray(points @ self.normal + self.offset_mm, dtype=np.float64)

def pixel_rays(intr: Intrinsics) -> FloatArray:
    """(H, W, 3) rays (x, y, 1) of every pixel centre, undistorted."""
    u, v = np.meshgrid(np.arange(intr.width, dtype=np.float64),
                       np.arange(intr.height, dtype=np.float64))
    if any(intr.coeffs):
        pts = np.stack([u.ravel(), v.ravel()], axis=-1).reshape(-1, 1, 2)
        und = cv2.undistortPoints(pts, intr.matrix(), np.array(intr.coeffs)).reshape(
            intr.height, intr.width, 2)
        x, y = und[..., 0], und[..., 1]
    else:
        x, y = (u - intr.cx) / intr.fx, (v - intr.cy) / intr.fy
    return np.stack([x, y, np.ones_like(x)], axis=-1)

def deproject(depth: U16Array, depth_scale_m: float, intr: Intrinsics,
              rays: FloatArray | None = None) -> FloatArray:
    """(H, W, 3) camera points in mm (NaN where depth is 0)."""
    if depth.shape != (intr.height, intr.width):
        raise BeltFitError(f"depth is {depth.shape[1]}x{depth.shape[0]} but the intrinsics are "
                           f"{intr.width}x{intr.height}: use the intrinsics of this stream")
    z = depth.astype(np.float64) * depth_scale_m * 1000.0
    z[depth == 0] = np.nan
    r = pixel_rays(intr) if rays is None else rays
    return r * z[..., None]

def _plane_from_points(pts: FloatArray) -> Plane:
    centroid = pts.mean(axis=0)
    _, _, vt = np.linalg.svd(pts - centroid, full_matrices=False)
    n = vt[2]
    d = -float(n @ centroid)
    if d < 0:
        n, d = -n, -d
    return Plane(n / np.linalg.norm(n), d)

def ransac_plane(points: FloatArray, *, threshold_mm: float = 15.0, seed: int = 0,
                 iterations: int = _RANSAC_ITERATIONS) -> tuple[Plane, BoolArray]:
    """The plane with the most points within `threshold_mm`, refined by least squares.

    After RANSAC the inlier band shrinks to 3.5 robust sigmas of the residuals
    (at least 3 mm) so that items and edges standing off the plane drop out.
    """
    if len(points) < 100:
        raise BeltFitError(f"only {len(points)} valid depth points: the belt is not in view or "
                           "the depth stream is empty; check the camera's view and lighting")
    rng = np.random.default_rng(seed)
    sample = points if len(points) <= _RANSAC_SAMPLE else points[
        rng.choice(len(points), _RANSAC_SAMPLE, replace=False)]
    best_count, best = -1, None
    for _ in range(iterations):
        tri = sample[rng.choice(len(sample), 3, replace=False)]
        n = np.cross(tri[1] - tri[0], tri[2] - tri[0])
        norm = np.linalg.norm(n)
        if norm < 1e-9:
            continue
        n /= norm
        count = int(np.count_nonzero(np.abs(sample @ n - n @ tri[0]) < threshold_mm))
        if count > best_count:
            best_count, best = count, (n, -float(n @ tri[0]))
    if best is None:
        raise BeltFitError("the depth points are degenerate (all on a line); check the camera")
    n, d = best
    inliers = np.abs(points @ n + d) < threshold_mm
    band = threshold_mm
    for _ in range(3):
        plane = _plane_from_points(points[inliers])
        h = plane.heights(points)
        sigma = 1.4826 * float(np.median(np.abs(h[inliers])))
        band = max(3.5 * sigma, 3.0)
        inliers = np.abs(h) < band
    return _plane_from_points(points[inliers]), inliers

def angle_deg(a: FloatArray, b: FloatArray) -> float:
    c = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))

def region_mask(pose: Pose, region: InspectionRegion, intr: Intrinsics,
                rays: FloatArray | None = None) -> BoolArray:
    """Pixels whose rays meet the stored belt plane inside the inspection region."""
    rays = pixel_rays(intr) if rays is None else rays
    d = rays @ pose.rotation.T
    c = pose.translation_mm
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(d[..., 2] < 0, -c[2] / d[..., 2], np.nan)
        x, y = c[0] + t * d[..., 0], c[1] + t * d[..., 1]
        return np.asarray(region.contains(x, y) & np.isfinite(t), dtype=bool)

def median_depth(depths: Sequence[U16Array]) -> U16Array:
    """Per-pixel median of the valid depth over several frames (0 where valid in fewer than
    half of them: unreliable). What `edge-calibrate belt` fits and the belt check judges."""
    stack = np.stack(depths).astype(np.float64)
    stack[stack == 0] = np.nan
    valid_count = np.sum(np.isfinite(stack), axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels: set to 0 below
        med = np.nanmedian(stack, axis=0)
    med[valid_count * 2 < stack.shape[0]] = 0
    return np.nan_to_num(med).round().astype(np.uint16)
