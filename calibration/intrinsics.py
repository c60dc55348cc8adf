"""Intrinsic calibration: find the board in each image, calibrate, reject bad views.

The quality figure throughout is the RMS reprojection error in pixels,
``sqrt(mean over all corners of |detected - reprojected|^2)`` -- what
``cv2.calibrateCamera`` returns -- not the mean of per-view L2 norms that
OpenCV's tutorial prints. Per-view figures are the same RMS over one view.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import structlog

from calibration.boards import BoardSpec
from edge.types import FloatArray, Intrinsics, U8Array, distortion

log = structlog.get_logger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: ROS camera_calibration's ranges: progress on x, y, size, skew is (max - min) / range.
COVERAGE_RANGES = {"x": 0.7, "y": 0.7, "size": 0.4, "skew": 0.5}


class CalibrationInputError(ValueError):
    """Input that cannot give a calibration; the message says what to do about it."""


@dataclass(frozen=True, slots=True)
class Detection:
    """The board corners found in one image."""

    name: str
    image_size: tuple[int, int]  # (width, height)
    image_points: FloatArray  # (N, 2) px
    object_points: FloatArray  # (N, 3) mm
    sharpness_px: float | None = None  # chessboards: mean edge width (lower is sharper)


@dataclass(frozen=True, slots=True)
class ViewResult:
    name: str
    rms_px: float
    corners: int
    used: bool
    rvec: FloatArray
    tvec: FloatArray
    residuals_px: FloatArray  # (N, 2) reprojected - detected


@dataclass(frozen=True, slots=True)
class IntrinsicsResult:
    intrinsics: Intrinsics
    rms_px: float
    views: tuple[ViewResult, ...]
    coverage: dict[str, float]
    rejected: dict[str, str] = field(default_factory=dict)  # image name -> why


def find_images(folder: Path) -> list[Path]:
    """Image files in `folder`, sorted by name."""
    if not folder.is_dir():
        raise CalibrationInputError(f"--images {folder}: no such folder; give the folder that "
                                    "holds the board photographs")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise CalibrationInputError(
            f"--images {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder; "
            "take photographs of the board and put them here")
    return images


def detect_board(gray: U8Array, spec: BoardSpec, name: str = "") -> Detection | None:
    """Corners of `spec` in a grey image (sub-pixel refined), or None if the board is not there."""
    size = (gray.shape[1], gray.shape[0])
    if spec.kind == "chessboard":
        flags = cv2.CALIB_CB_ADAPTIVE_THRESH | cv2.CALIB_CB_NORMALIZE_IMAGE
        found, corners = cv2.findChessboardCorners(gray, (spec.cols, spec.rows), flags=flags)
        if not found:
            return None
        criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 100, 1e-4)
        corners = cv2.cornerSubPix(gray, corners, (5, 5), (-1, -1), criteria)
        sharp = cv2.estimateChessboardSharpness(gray, (spec.cols, spec.rows), corners)
        pts = corners.reshape(-1, 2).astype(np.float64)
        edge_width = float(np.asarray(sharp[0], dtype=np.float64).ravel()[0])
        return Detection(name, size, pts, spec.object_points(), edge_width)
    board = spec.charuco_board()
    params = cv2.aruco.CharucoParameters()
    detector = cv2.aruco.CharucoDetector(board, params)
    ch_corners, ch_ids, _, _ = detector.detectBoard(gray)
    if ch_ids is None or len(ch_ids) < 6:
        return None
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 100, 1e-4)
    ch_corners = cv2.cornerSubPix(gray, ch_corners.astype(np.float32), (3, 3), (-1, -1), criteria)
    obj, img = board.matchImagePoints(ch_corners, ch_ids)
    if obj is None or len(obj) < 6:
        return None
    if board.checkCharucoCornersCollinear(ch_ids):
        return None
    return Detection(name, size, img.reshape(-1, 2).astype(np.float64),
                     obj.reshape(-1, 3).astype(np.float64))


def view_coverage_params(det: Detection) -> tuple[float, float, float, float]:
    """ROS camera_calibration's (x, y, size, skew) of one view, each in 0..1."""
    w, h = det.image_size
    pts = det.image_points
    hull = cv2.convexHull(pts.astype(np.float32))
    area = float(cv2.contourArea(hull))
    border = np.sqrt(max(area, 1e-9))
    x = float(np.clip((pts[:, 0].mean() - border / 2) / max(w - border, 1.0), 0.0, 1.0))
    y = float(np.clip((pts[:, 1].mean() - border / 2) / max(h - border, 1.0), 0.0, 1.0))
    size = float(np.sqrt(area / (w * h)))
    # skew: how far the board's outline is from a rectangle (angle at a corner of the hull)
    poly = cv2.approxPolyDP(hull, 0.02 * cv2.arcLength(hull, True), True).reshape(-1, 2)
    if len(poly) >= 3:
        a, b, c = poly[0].astype(float), poly[1].astype(float), poly[2].astype(float)
        ab, cb = a - b, c - b
        angle = np.arccos(np.clip(np.dot(ab, cb) / (np.linalg.norm(ab) * np.linalg.norm(cb)),
                                  -1, 1))
        skew = float(min(1.0, 2.0 * abs(np.pi / 2 - angle)))
    else:
        skew = 0.0
    return (x, y, size, skew)


def coverage(detections: list[Detection]) -> dict[str, float]:
    """Progress per ROS parameter: (max - min) over the views / its range, capped at 1."""
    if not detections:
        return dict.fromkeys(COVERAGE_RANGES, 0.0)
    params = np.array([view_coverage_params(d) for d in detections])
    out = {}
    for i, (key, span) in enumerate(COVERAGE_RANGES.items()):
        lo, hi = float(params[:, i].min()), float(params[:, i].max())
        if key in ("size", "skew"):
            lo = 0.0  # ROS counts size and skew from 0
        out[key] = round(min(1.0, (hi - lo) / span), 3)
    return out


def _calibrate_once(dets: list[Detection], size: tuple[int, int], flags: int) -> tuple[
        float, FloatArray, FloatArray, list[FloatArray], list[FloatArray], FloatArray]:
    obj = [d.object_points.astype(np.float32) for d in dets]
    img = [d.image_points.astype(np.float32) for d in dets]
    criteria = (cv2.TERM_CRITERIA_COUNT + cv2.TERM_CRITERIA_EPS, 100, 1e-10)
    rms, K, dist, rvecs, tvecs, _, _, per_view = cv2.calibrateCameraExtended(
        obj, img, size, np.eye(3), np.zeros(5), flags=flags, criteria=criteria)

    def f64(a: object) -> FloatArray:
        return np.asarray(a, dtype=np.float64)

    return (float(rms), f64(K), f64(dist).reshape(-1), [f64(r) for r in rvecs],
            [f64(t) for t in tvecs], f64(per_view).reshape(-1))


def calibrate(dets: list[Detection], *, min_views: int = 6, outlier_factor: float = 3.0,
              outlier_floor_px: float = 0.5, flags: int = 0) -> IntrinsicsResult:
    """Calibrate pinhole + 5 distortion coefficients, dropping outlier views once.

    A view is an outlier when its RMS exceeds both `outlier_factor` times the
    median view RMS and `outlier_floor_px`; it is dropped and the rest are
    calibrated again (never below `min_views`).
    """
    if len(dets) < min_views:
        raise CalibrationInputError(
            f"only {len(dets)} usable view(s), at least {min_views} are needed: take more "
            "photographs of the board (whole board in view, sharp, at different positions, "
            "distances and tilts)")
    size = dets[0].image_size
    if any(d.image_size != size for d in dets):
        raise CalibrationInputError("the images have different sizes: calibrate one resolution "
                                    "at a time (the node's streams' resolution)")
    rms, K, dist, rvecs, tvecs, per_view = _calibrate_once(dets, size, flags)
    used = [True] * len(dets)
    limit = max(outlier_factor * float(np.median(per_view)), outlier_floor_px)
    bad = [i for i, e in enumerate(per_view) if e > limit]
    rejected: dict[str, str] = {}
    if bad and len(dets) - len(bad) >= min_views:
        keep = [d for i, d in enumerate(dets) if i not in bad]
        for i in bad:
            used[i] = False
            rejected[dets[i].name] = f"outlier: view RMS {per_view[i]:.2f} px > {limit:.2f} px"
        rms, K, dist, rvecs_k, tvecs_k, _ = _calibrate_once(keep, size, flags)
        log.info("calibration.outliers_dropped", views=[dets[i].name for i in bad])
        # poses for the dropped views, from the final model
        rvecs, tvecs = [], []
        it = iter(zip(rvecs_k, tvecs_k, strict=True))
        for i, d in enumerate(dets):
            if used[i]:
                r, t = next(it)
            else:
                _, r_raw, t_raw = cv2.solvePnP(d.object_points, d.image_points, K, dist)
                r, t = np.asarray(r_raw, np.float64), np.asarray(t_raw, np.float64)
            rvecs.append(r)
            tvecs.append(t)
    intr = Intrinsics(size[0], size[1], float(K[0, 0]), float(K[1, 1]), float(K[0, 2]),
                      float(K[1, 2]), distortion(dist.ravel()))
    views = []
    for i, d in enumerate(dets):
        proj, _ = cv2.projectPoints(d.object_points, rvecs[i], tvecs[i], K, dist)
        res = proj.reshape(-1, 2) - d.image_points
        views.append(ViewResult(d.name, float(np.sqrt(np.mean(np.sum(res**2, axis=1)))),
                                len(d.image_points), used[i], np.asarray(rvecs[i]).reshape(3),
                                np.asarray(tvecs[i]).reshape(3), res))
    return IntrinsicsResult(intr, rms, tuple(views), coverage([d for d, u in zip(
        dets, used, strict=True) if u]), rejected)
