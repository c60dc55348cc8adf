"""The node's views: a frame source, a belt plane and a calibration per camera ID."""

from __future__ import annotations

from dataclasses import dataclass, field

from edge.capture.calibration import CameraCalibration
from edge.capture.source import FrameSource
from edge.perception.belt_plane import BeltPlane


@dataclass(slots=True)
class Cameras:
    """The node's views: a source and a belt plane per camera ID (built by
    `edge.app.cameras.open_cameras`)."""

    sources: dict[str, FrameSource]
    planes: dict[str, BeltPlane]
    calibrations: dict[str, CameraCalibration] = field(default_factory=dict)
