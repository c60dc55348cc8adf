"""Rendered calibration targets with known truth, shared by the calibration tests."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from calibration.belt import fit_belt_plane, inspection_region, travel_from_image
from calibration.boards import BoardSpec, parse_board
from calibration.render import (
    DepthNoise,
    board_views,
    render_belt_depth,
    render_board,
    undistorted_rays,
)
from edge.capture.calibration import CameraCalibration
from edge.types import Frame, Intrinsics, Pose

#: The camera the boards are rendered with (truth for the intrinsics tests).
TRUE_CAMERA = Intrinsics(640, 480, 600.0, 605.0, 322.5, 236.0,
                         (-0.12, 0.08, 0.001, -0.0015, 0.0))
CHESSBOARD = "chessboard:9x6:25"
CHARUCO = "charuco:9x7:25:18:DICT_4X4_50"


def render_views(spec: BoardSpec, out: Path, count: int, seed: int, **kw: float) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    rays = undistorted_rays(TRUE_CAMERA, 3)
    for k, (rvec, tvec) in enumerate(board_views(spec, TRUE_CAMERA, count, seed=seed)):
        img = render_board(spec, TRUE_CAMERA, rvec, tvec, rays=rays, seed=k, **kw)
        cv2.imwrite(str(out / f"view{k:02d}.png"), img)
    return out


@pytest.fixture(scope="session")
def chessboard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 noise-free chessboard views (9x6 inner corners, 25 mm) of TRUE_CAMERA."""
    return render_views(parse_board(CHESSBOARD), tmp_path_factory.mktemp("chess"), 12, seed=2)


@pytest.fixture(scope="session")
def charuco_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """15 noise-free ChArUco views (9x7 squares) of TRUE_CAMERA."""
    return render_views(parse_board(CHARUCO), tmp_path_factory.mktemp("charuco"), 15, seed=2)


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded random generator."""
    return np.random.default_rng(1234)


def still_frames(color: np.ndarray, depth: np.ndarray, intr: Intrinsics, count: int = 3,
                 camera_id: str = "cam") -> list[Frame]:
    """`count` frames of a still scene, numbered and 1/30 s apart (for .db3 recordings)."""
    return [Frame(camera_id, i, 1000.0 + i * 1000.0 / 30, color, depth, 0.001, intr)
            for i in range(count)]


def belt_calibration_of(camera: Intrinsics, pose: Pose) -> CameraCalibration:
    """A belt calibration of `camera` at `pose`, made from a noisy frame of the empty belt
    (serial C1, a 600 x 500 mm region, belt travelling up the image)."""
    depth = render_belt_depth(camera, pose, noise=DepthNoise(), seed=11)
    fit = fit_belt_plane(depth, 0.001, camera)
    belt_pose, region = inspection_region(fit, camera, travel_from_image(fit.plane, "up"),
                                          size_mm=(600.0, 500.0))
    return CameraCalibration("C1", camera, pose=belt_pose, region=region)
