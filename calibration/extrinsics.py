"""Camera-to-camera pose from simultaneous views of one shared ChArUco board.

For each image pair (same moment, one image per camera) the board's pose in
each camera comes from its ChArUco corners (solvePnP with each camera's
calibrated intrinsics); ``T_b<-a = T_b<-board . T_board<-a``. The pairs are
averaged (chordal mean of the rotations, mean of the translations) and the
spread between pairs is reported. When both cameras have belt poses, the
relative pose they imply is compared with the board's.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from calibration.boards import BoardSpec
from calibration.intrinsics import CalibrationInputError, Detection, detect_board
from edge.capture.calibration import CameraCalibration
from edge.types import FloatArray, Pose, U8Array


@dataclass(frozen=True, slots=True)
class PairResult:
    name: str
    pose_b_from_a: Pose | None  # maps camera-a coordinates to camera-b coordinates
    rms_a_px: float | None
    rms_b_px: float | None
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class ExtrinsicsResult:
    pose_b_from_a: Pose
    pairs: tuple[PairResult, ...]
    spread_translation_mm: float  # max deviation of a pair from the mean
    spread_rotation_deg: float
    belt_translation_diff_mm: float | None  # board result vs the belt poses
    belt_rotation_diff_deg: float | None


def rotation_angle_deg(R: FloatArray) -> float:
    return float(np.degrees(np.arccos(np.clip((np.trace(R) - 1.0) / 2.0, -1.0, 1.0))))


def _board_pose(det: Detection, cal: CameraCalibration) -> tuple[Pose, float]:
    """Pose board -> camera and the reprojection RMS."""
    K, dist = cal.intrinsics.matrix(), np.array(cal.intrinsics.coeffs)
    ok, rvec, tvec = cv2.solvePnP(det.object_points, det.image_points, K, dist,
                                  flags=cv2.SOLVEPNP_ITERATIVE)
    if not ok:
        raise CalibrationInputError(f"{det.name}: the board pose could not be solved")
    rvec, tvec = cv2.solvePnPRefineLM(det.object_points, det.image_points, K, dist, rvec, tvec)
    proj, _ = cv2.projectPoints(det.object_points, rvec, tvec, K, dist)
    rms = float(np.sqrt(np.mean(np.sum((proj.reshape(-1, 2) - det.image_points) ** 2, axis=1))))
    R = np.asarray(cv2.Rodrigues(rvec)[0], dtype=np.float64)
    return Pose(R, np.asarray(tvec, dtype=np.float64).reshape(3)), rms


def _mean_pose(poses: list[Pose]) -> Pose:
    u, _, vt = np.linalg.svd(sum(p.rotation for p in poses))
    R = u @ vt
    if np.linalg.det(R) < 0:
        u[:, -1] = -u[:, -1]
        R = u @ vt
    return Pose(R, np.mean([p.translation_mm for p in poses], axis=0))


def pair_pose(gray_a: U8Array, gray_b: U8Array, spec: BoardSpec, cal_a: CameraCalibration,
              cal_b: CameraCalibration, name: str) -> PairResult:
    det_a = detect_board(gray_a, spec, name)
    det_b = detect_board(gray_b, spec, name)
    missing = [c for c, d in (("a", det_a), ("b", det_b)) if d is None]
    if missing or det_a is None or det_b is None:
        return PairResult(name, None, None, None,
                          f"board not found by camera {' and '.join(missing)}")
    board_to_a, rms_a = _board_pose(det_a, cal_a)
    board_to_b, rms_b = _board_pose(det_b, cal_b)
    return PairResult(name, board_to_b.compose(board_to_a.inverse()), rms_a, rms_b)


def camera_to_camera(images_a: list[tuple[str, U8Array]], images_b: list[tuple[str, U8Array]],
                     spec: BoardSpec, cal_a: CameraCalibration,
                     cal_b: CameraCalibration) -> ExtrinsicsResult:
    """Pose of camera a in camera b's frame from paired images (same order, same moments)."""
    if spec.kind != "charuco":
        raise CalibrationInputError(
            f"extrinsics needs a ChArUco board (each camera may see only part of it), got {spec}")
    if not images_a or len(images_a) != len(images_b):
        raise CalibrationInputError(
            f"got {len(images_a)} images of camera a and {len(images_b)} of camera b: take the "
            "same number, one pair per board position, both cameras at the same moment")
    pairs = [pair_pose(ga, gb, spec, cal_a, cal_b, f"{na} | {nb}")
             for (na, ga), (nb, gb) in zip(images_a, images_b, strict=True)]
    good = [p.pose_b_from_a for p in pairs if p.pose_b_from_a is not None]
    if not good:
        raise CalibrationInputError(
            "no image pair shows the board to both cameras: place the ChArUco board where both "
            "cameras see (at least part of) it and take the images again")
    mean = _mean_pose(good)
    spread_t = max(float(np.linalg.norm(p.translation_mm - mean.translation_mm)) for p in good)
    spread_r = max(rotation_angle_deg(p.rotation @ mean.rotation.T) for p in good)
    dt = dr = None
    if cal_a.pose is not None and cal_b.pose is not None:
        from_belt = cal_b.pose.inverse().compose(cal_a.pose)  # a -> belt -> b
        dt = float(np.linalg.norm(from_belt.translation_mm - mean.translation_mm))
        dr = rotation_angle_deg(from_belt.rotation @ mean.rotation.T)
    return ExtrinsicsResult(mean, tuple(pairs), spread_t, spread_r, dt, dr)


def pose_b_in_belt(cal_a: CameraCalibration, pose_b_from_a: Pose) -> Pose:
    """Camera b's belt pose implied by camera a's belt pose and the camera-to-camera pose."""
    if cal_a.pose is None:
        raise CalibrationInputError("camera a has no belt pose: run edge-calibrate belt for it")
    return cal_a.pose.compose(pose_b_from_a.inverse())


def pose_difference(p: Pose, q: Pose) -> tuple[float, float]:
    """(translation mm, rotation deg) between two poses."""
    return (float(np.linalg.norm(p.translation_mm - q.translation_mm)),
            rotation_angle_deg(p.rotation @ q.rotation.T))

