"""The node's belt check: is the belt where the stored calibration says it is?

`check_belt` is pure (no camera, no I/O). It fits the belt plane robustly
over the inspection region (RANSAC, so boxes on the belt do not disturb it as
long as most of the region shows belt) and compares it with the stored one.
The node judges the belt as `edge-calibrate belt` measured it: through a
`BeltChecker`, on the per-pixel median of several depth frames, with a fill
limit no stricter than the fill rate the calibration accepted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge.capture.calibration import CameraCalibration
from edge.perception.plane_fit import (
    BeltFitError,
    Plane,
    angle_deg,
    deproject,
    median_depth,
    pixel_rays,
    ransac_plane,
    region_mask,
)
from edge.types import BoolArray, FloatArray, U16Array

#: Depth frames the node combines per check: `edge-calibrate belt --frames` by default.
CHECK_FRAMES = 10

#: How far below the fill rate recorded at calibration the check still passes: that fill was
#: accepted then, and the median of other frames measures a few points either side of it
#: with nothing changed. (The calibration measured the whole image, the check measures the
#: inspection region: a hole that grew inside the region still fails.)
FILL_MARGIN = 0.1

@dataclass(frozen=True, slots=True)
class BeltCheckThresholds:
    max_drift_mm: float = 5.0  # belt surface moved along its normal at the region centre
    max_tilt_deg: float = 1.0  # angle between the stored and the current belt normal
    min_fill_rate: float = 0.7  # valid depth pixels in the inspection region
    min_belt_fraction: float = 0.3  # of the valid region pixels that lie on the fitted plane

@dataclass(frozen=True, slots=True)
class BeltCheckResult:
    passed: bool
    drift_mm: float | None  # + : the belt surface is closer to the camera than calibrated
    tilt_deg: float | None
    fill_rate: float
    residual_rms_mm: float | None
    belt_fraction: float | None  # share of valid region pixels on the fitted plane
    reasons: tuple[str, ...]

    def as_dict(self) -> dict[str, object]:
        def r(v: float | None, n: int) -> float | None:
            return None if v is None else round(float(v), n)

        return {"passed": self.passed, "drift_mm": r(self.drift_mm, 2),
                "tilt_deg": r(self.tilt_deg, 3), "fill_rate": r(self.fill_rate, 4),
                "residual_rms_mm": r(self.residual_rms_mm, 2),
                "belt_fraction": r(self.belt_fraction, 3), "reasons": list(self.reasons)}

def stored_plane(cal: CameraCalibration) -> Plane:
    """The calibrated belt plane (belt z = 0) in camera coordinates."""
    if cal.pose is None:
        raise ValueError(f"calibration of camera {cal.serial} has no belt pose: run "
                         "edge-calibrate belt first")
    return Plane(np.asarray(cal.pose.rotation[2, :], dtype=np.float64),
                 float(cal.pose.translation_mm[2]))

def calibrated_thresholds(calibration: CameraCalibration,
                          base: BeltCheckThresholds | None = None) -> BeltCheckThresholds:
    """`base` with its fill limit lowered to the calibration's recorded fill rate minus
    FILL_MARGIN, when that is lower: a belt calibrated at 55 % fill is not failed at 70 %."""
    th = base or BeltCheckThresholds()
    fill = calibration.quality.fill_rate
    if fill is None:
        return th
    return dataclasses.replace(th, min_fill_rate=max(0.0, min(th.min_fill_rate,
                                                              fill - FILL_MARGIN)))

def check_belt(calibration: CameraCalibration, depth: U16Array, depth_scale_m: float,
               thresholds: BeltCheckThresholds | None = None, *, seed: int = 0,
               rays: FloatArray | None = None, mask: BoolArray | None = None) -> BeltCheckResult:
    """Compare the belt plane in `depth` with the calibrated one; pass or fail with reasons.

    `rays` (`belt.pixel_rays`) and `mask` (`belt.region_mask`) may be passed
    precomputed; `BeltChecker` does that for repeated checks of one camera.
    """
    th = thresholds or BeltCheckThresholds()
    cal = calibration
    intr = cal.intrinsics
    if cal.pose is None or cal.region is None:
        return BeltCheckResult(False, None, None, 0.0, None, None, (
            "the calibration has no belt pose: run edge-calibrate belt",))
    if depth.shape != (intr.height, intr.width):
        return BeltCheckResult(False, None, None, 0.0, None, None, (
            f"depth is {depth.shape[1]}x{depth.shape[0]}, the calibration is for "
            f"{intr.width}x{intr.height}",))
    if rays is None:
        rays = pixel_rays(intr)
    if mask is None:
        mask = region_mask(cal.pose, cal.region, intr, rays)
    total = int(np.count_nonzero(mask))
    valid = mask & (depth > 0)
    fill = float(np.count_nonzero(valid)) / max(total, 1)
    reasons: list[str] = []
    if fill < th.min_fill_rate:
        reasons.append(f"depth fill rate {fill:.1%} < {th.min_fill_rate:.0%} in the inspection "
                       "region: clean the lens, check lighting and the emitter")
    pts = deproject(depth, depth_scale_m, intr, rays)[valid]
    try:
        plane, inliers = ransac_plane(pts, seed=seed)
    except BeltFitError as exc:
        return BeltCheckResult(False, None, None, fill, None, None, (*reasons, str(exc)))
    ref = stored_plane(cal)
    origin_cam = cal.pose.inverse().translation_mm
    drift = -float(plane.heights(origin_cam[None, :])[0])
    tilt = angle_deg(ref.normal, plane.normal)
    residual = float(np.sqrt(np.mean(plane.heights(pts[inliers]) ** 2)))
    belt_fraction = float(inliers.mean())
    if abs(drift) > th.max_drift_mm:
        reasons.append(f"belt plane drifted {drift:+.1f} mm (limit {th.max_drift_mm:g} mm): the "
                       "camera or the belt moved; re-run edge-calibrate belt")
    if tilt > th.max_tilt_deg:
        reasons.append(f"belt plane tilted {tilt:.2f} deg (limit {th.max_tilt_deg:g} deg): the "
                       "camera mount moved; re-run edge-calibrate belt")
    if belt_fraction < th.min_belt_fraction:
        reasons.append(f"only {belt_fraction:.0%} of the region is on one plane: clear the belt "
                       "and check again")
    return BeltCheckResult(not reasons, drift, tilt, fill, residual, belt_fraction, tuple(reasons))

class BeltChecker:
    """`check_belt` for one camera, with its per-pixel rays and region mask computed once.

    The node builds one per camera at start and calls `check_frames` with
    CHECK_FRAMES of its depth frames at start and periodically (about 0.5 s
    per call at 640x480 on one core, most of it the median: run it off the
    frame path). Without
    explicit `thresholds` the fill limit follows the calibration
    (`calibrated_thresholds`).
    """

    def __init__(self, calibration: CameraCalibration,
                 thresholds: BeltCheckThresholds | None = None) -> None:
        self.calibration = calibration
        self.thresholds = thresholds or calibrated_thresholds(calibration)
        intr = calibration.intrinsics
        self._rays = pixel_rays(intr)
        self._mask = None
        if calibration.pose is not None and calibration.region is not None:
            self._mask = region_mask(calibration.pose, calibration.region, intr, self._rays)

    def check(self, depth: U16Array, depth_scale_m: float) -> BeltCheckResult:
        return check_belt(self.calibration, depth, depth_scale_m, self.thresholds,
                          rays=self._rays, mask=self._mask)

    def check_frames(self, depths: Sequence[U16Array], depth_scale_m: float) -> BeltCheckResult:
        """Check the per-pixel median of `depths`, the depth `edge-calibrate belt` fits (its
        own `median_depth`): a dropout burst or a noisy pixel in one frame does not count."""
        if not depths:
            raise ValueError("no depth frames to check the belt with")
        return self.check(median_depth(depths), depth_scale_m)
