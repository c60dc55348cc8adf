"""Health checks of a stored calibration against what the camera sees now: the board check
here; the belt check is the node's own (`edge.perception.belt_check`).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from calibration.boards import BoardSpec
from calibration.intrinsics import detect_board
from edge.capture.calibration import CameraCalibration
from edge.types import U8Array


@dataclass(frozen=True, slots=True)
class BoardCheckResult:
    found: bool
    rms_px: float | None
    passed: bool
    reasons: tuple[str, ...]

    def as_dict(self) -> dict[str, object]:
        return {"found": self.found, "passed": self.passed,
                "rms_px": None if self.rms_px is None else round(self.rms_px, 3),
                "reasons": list(self.reasons)}


def check_board(calibration: CameraCalibration, color: U8Array, spec: BoardSpec, *,
                max_rms_px: float = 1.0) -> BoardCheckResult:
    """Reprojection RMS of a board in view under the stored intrinsics (board not shown: passes)."""
    gray = np.asarray(color if color.ndim == 2 else cv2.cvtColor(color, cv2.COLOR_BGR2GRAY),
                      dtype=np.uint8)
    det = detect_board(gray, spec)
    if det is None:
        return BoardCheckResult(False, None, True, ())
    intr = calibration.intrinsics
    K, dist = intr.matrix(), np.array(intr.coeffs)
    ok, rvec, tvec = cv2.solvePnP(det.object_points, det.image_points, K, dist)
    if not ok:
        return BoardCheckResult(True, None, False, ("the board pose could not be solved",))
    proj, _ = cv2.projectPoints(det.object_points, rvec, tvec, K, dist)
    rms = float(np.sqrt(np.mean(np.sum((proj.reshape(-1, 2) - det.image_points) ** 2, axis=1))))
    if rms > max_rms_px:
        return BoardCheckResult(True, rms, False, (
            f"board reprojection RMS {rms:.2f} px > {max_rms_px:g} px under the stored "
            "intrinsics: re-run edge-calibrate intrinsics",))
    return BoardCheckResult(True, rms, True, ())
