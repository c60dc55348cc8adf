"""The belt in a camera's view: robust plane fit, travel direction, belt frame and region.

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

from calibration.files import InspectionRegion
from edge.types import BoolArray, F32Array, FloatArray, Intrinsics, Pose, U8Array, U16Array

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


@dataclass(frozen=True, slots=True)
class PlaneFit:
    plane: Plane
    residual_rms_mm: float  # RMS of inlier heights
    inlier_fraction: float  # of the valid depth pixels considered
    fill_rate: float  # valid depth pixels / pixels considered
    inlier_threshold_mm: float
    heights_mm: F32Array  # (H, W) height above the fitted plane, NaN where no depth


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


def fit_belt_plane(depth: U16Array, depth_scale_m: float, intr: Intrinsics, *,
                   mask: BoolArray | None = None, threshold_mm: float = 15.0,
                   seed: int = 0) -> PlaneFit:
    """Fit the belt plane to the depth pixels in `mask` (default: the whole image)."""
    pts = deproject(depth, depth_scale_m, intr)
    considered = np.ones(depth.shape, bool) if mask is None else mask
    valid = considered & (depth > 0)
    plane, inl = ransac_plane(pts[valid], threshold_mm=threshold_mm, seed=seed)
    heights = plane.heights(pts.reshape(-1, 3)).reshape(depth.shape).astype(np.float32)
    h_in = heights[valid][inl]
    total = int(np.count_nonzero(considered))
    return PlaneFit(plane, float(np.sqrt(np.mean(h_in.astype(np.float64) ** 2))),
                    float(inl.mean()), float(np.count_nonzero(valid)) / max(total, 1),
                    float(np.max(np.abs(h_in))) if h_in.size else threshold_mm, heights)


def intersect_plane(pixels: FloatArray, intr: Intrinsics, plane: Plane) -> FloatArray:
    """Camera points (N, 3) where the rays of image points (N, 2) meet the plane."""
    und = cv2.undistortPoints(np.asarray(pixels, np.float64).reshape(-1, 1, 2), intr.matrix(),
                              np.array(intr.coeffs)).reshape(-1, 2)
    rays = np.column_stack([und, np.ones(len(und))])
    t = -plane.offset_mm / (rays @ plane.normal)
    return rays * t[:, None]


def find_markers(color: U8Array, dictionary: str = "DICT_4X4_50") -> dict[int, FloatArray]:
    """Centres (px) of the ArUco markers found in a colour image, by id."""
    gray = color if color.ndim == 2 else cv2.cvtColor(color, cv2.COLOR_BGR2GRAY)
    dic = cv2.aruco.getPredefinedDictionary(getattr(cv2.aruco, dictionary))
    detector = cv2.aruco.ArucoDetector(dic, cv2.aruco.DetectorParameters())
    corners, ids, _ = detector.detectMarkers(gray)
    found: dict[int, FloatArray] = {}
    for c, i in zip(corners, [] if ids is None else np.asarray(ids).ravel(), strict=True):
        found[int(i)] = np.asarray(c, dtype=np.float64).reshape(4, 2).mean(axis=0)
    return found


def travel_from_track(points_cam: Sequence[FloatArray], plane: Plane) -> FloatArray:
    """Unit travel direction (camera coords, in the plane) from positions in time order.

    Two points (two markers, upstream first) or a track of one marker moved
    downstream along the belt; a least-squares line through the track, oriented
    from the first position to the last.
    """
    pts = np.asarray(points_cam, dtype=np.float64).reshape(-1, 3)
    if len(pts) < 2:
        raise BeltFitError("the travel direction needs at least two marker positions")
    centred = pts - pts.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    direction = vt[0]
    if np.dot(direction, pts[-1] - pts[0]) < 0:
        direction = -direction
    direction = direction - np.dot(direction, plane.normal) * plane.normal
    norm = float(np.linalg.norm(direction))
    span = float(np.linalg.norm(pts[-1] - pts[0]))
    if norm < 1e-6 or span < 200.0:
        raise BeltFitError(f"the marker positions are only {span:.0f} mm apart: move the marker "
                           "(or place the two markers) at least 20 cm apart along the belt")
    return np.asarray(direction / norm, dtype=np.float64)


def travel_from_image(plane: Plane, direction: str = "up") -> FloatArray:
    """Travel direction given as an image direction (up, down, left, right), onto the belt."""
    vectors = {"up": (0.0, -1.0, 0.0), "down": (0.0, 1.0, 0.0), "left": (-1.0, 0.0, 0.0),
               "right": (1.0, 0.0, 0.0)}
    if direction not in vectors:
        raise BeltFitError(f"image direction {direction!r}: expected one of {', '.join(vectors)}")
    v = np.array(vectors[direction])
    v = v - np.dot(v, plane.normal) * plane.normal
    norm = float(np.linalg.norm(v))
    if norm < 1e-3:
        raise BeltFitError(f"image direction {direction!r} is perpendicular to the belt; use "
                           "markers to give the travel direction")
    return np.asarray(v / norm, dtype=np.float64)


def belt_pose(plane: Plane, travel_cam: FloatArray, origin_cam: FloatArray) -> Pose:
    """Pose (camera -> belt) of the belt frame: x = travel, z = plane normal, origin given."""
    z = plane.normal
    x = travel_cam - np.dot(travel_cam, z) * z
    x = x / np.linalg.norm(x)
    y = np.cross(z, x)
    R = np.stack([x, y, z])  # rows: belt axes in camera coordinates
    origin = origin_cam - plane.heights(origin_cam[None, :])[0] * z  # onto the plane
    return Pose(R, -R @ origin)


def inspection_region(fit: PlaneFit, intr: Intrinsics, travel_cam: FloatArray, *,
                      size_mm: tuple[float, float] | None = None,
                      percentile: float = 2.0) -> tuple[Pose, InspectionRegion]:
    """Belt-frame pose and region: the centre of the belt surface seen (inlier pixels).

    The region spans the [percentile, 100 - percentile] range of the seen belt
    along x and y, or `size_mm` (length along travel, width across) around
    its centre.
    """
    axis_hit = intersect_plane(np.array([[intr.cx, intr.cy]]), intr, fit.plane)[0]
    provisional = belt_pose(fit.plane, travel_cam, axis_hit)
    on_belt = np.abs(fit.heights_mm) <= fit.inlier_threshold_mm
    v, u = np.nonzero(on_belt)
    if len(u) < 100:
        raise BeltFitError("too few belt pixels to place the inspection region")
    pts = intersect_plane(np.column_stack([u, v]).astype(np.float64), intr, fit.plane)
    belt_xy = provisional.apply(pts)[:, :2]
    lo = np.percentile(belt_xy, percentile, axis=0)
    hi = np.percentile(belt_xy, 100.0 - percentile, axis=0)
    centre_belt = np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, 0.0])
    centre_cam = provisional.inverse().apply(centre_belt)
    pose = belt_pose(fit.plane, travel_cam, centre_cam)
    half = (hi - lo) / 2 if size_mm is None else np.array(size_mm, dtype=np.float64) / 2
    region = InspectionRegion(-float(half[0]), float(half[0]), -float(half[1]), float(half[1]))
    return pose, region


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
