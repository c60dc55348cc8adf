"""The belt in a camera's view: plane fit, travel direction, belt frame and region.

The robust plane fit itself (`edge.perception.plane_fit`) is shared with the node's belt
check; planes are written ``n . p + d = 0`` in camera coordinates (mm), normal towards the
camera.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from edge.capture.calibration import InspectionRegion
from edge.perception.plane_fit import BeltFitError, Plane, deproject, ransac_plane
from edge.types import BoolArray, F32Array, FloatArray, Intrinsics, Pose, U8Array, U16Array


@dataclass(frozen=True, slots=True)
class PlaneFit:
    plane: Plane
    residual_rms_mm: float  # RMS of inlier heights
    inlier_fraction: float  # of the valid depth pixels considered
    fill_rate: float  # valid depth pixels / pixels considered
    inlier_threshold_mm: float
    heights_mm: F32Array  # (H, W) height above the fitted plane, NaN where no depth


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


