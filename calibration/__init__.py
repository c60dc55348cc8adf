"""Camera calibration for conveyor-vision: the `edge-calibrate` tool and the node's health check.

The node uses three things from here: `CameraCalibration` and
`load_camera_calibration` (the per-camera YAML file), and `check_belt` (a pure
function comparing a depth frame with the calibrated belt plane).
"""

from calibration.check import BeltChecker, BeltCheckResult, BeltCheckThresholds, check_belt
from calibration.files import (
    CalibrationError,
    CameraCalibration,
    InspectionRegion,
    Quality,
    load_camera_calibration,
)

__all__ = [
    "BeltCheckResult",
    "BeltCheckThresholds",
    "BeltChecker",
    "CalibrationError",
    "CameraCalibration",
    "InspectionRegion",
    "Quality",
    "check_belt",
    "load_camera_calibration",
]
