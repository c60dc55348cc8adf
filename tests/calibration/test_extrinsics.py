"""`edge-calibrate extrinsics`: camera-to-camera pose from a shared ChArUco board."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from calibration.boards import parse_board
from calibration.cli import main
from calibration.extrinsics import pose_difference
from calibration.render import render_board, undistorted_rays
from edge.capture.calibration import CameraCalibration, load_camera_calibration
from edge.types import Intrinsics, Pose

BOARD = "charuco:7x5:40:30:DICT_4X4_50"
CAM_A = Intrinsics(640, 480, 615.0, 615.0, 319.5, 239.5, (0.05, -0.1, 0.0, 0.0, 0.0))
CAM_B = Intrinsics(640, 480, 600.0, 602.0, 325.0, 236.0, (-0.08, 0.05, 0.0005, 0.0, 0.0))
POSE_A = Pose.look_at(np.array([0.0, 0.0, 900.0]), np.array([0.0, 0.0, 0.0]),
                      up=np.array([0.0, 1.0, 0.0]))
POSE_B = Pose.look_at(np.array([100.0, -620.0, 700.0]), np.array([0.0, 0.0, 40.0]),
                      up=np.array([0.0, 0.0, 1.0]))


def _board_in_belt(k: int, rng: np.random.Generator) -> Pose:
    """Board k lying on a wedge on the belt, tilted towards camera B, at varied places."""
    spec = parse_board(BOARD)
    w, h = spec.size_mm
    R = cv2.Rodrigues(np.array([np.radians(rng.uniform(15, 35)), 0.0,
                                np.radians(rng.uniform(-20, 20))]))[0]
    flip = np.diag([1.0, -1.0, -1.0])  # board z (OpenCV: into the board) points down
    R = R @ flip
    centre = np.array([rng.uniform(-120, 120), rng.uniform(-60, 60), rng.uniform(20, 120)])
    return Pose(R, centre - R @ np.array([w / 2, h / 2, 0.0]))


def _render_pairs(root: Path, count: int = 6) -> None:
    spec = parse_board(BOARD)
    rng = np.random.default_rng(5)
    rays = {"a": undistorted_rays(CAM_A, 2), "b": undistorted_rays(CAM_B, 2)}
    for k in range(count):
        board = _board_in_belt(k, rng)
        for name, cam, pose in (("a", CAM_A, POSE_A), ("b", CAM_B, POSE_B)):
            to_cam = pose.inverse().compose(board)
            rvec = cv2.Rodrigues(to_cam.rotation)[0].reshape(3)
            img = render_board(spec, cam, rvec, to_cam.translation_mm, supersample=2,
                               rays=rays[name])
            (root / name).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / name / f"pair{k:02d}.png"), img)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six image pairs of one ChArUco board seen by cameras A (top) and B (oblique)."""
    root = tmp_path_factory.mktemp("pairs")
    _render_pairs(root)
    return root


def _run(pairs: Path, tmp_path: Path, *extra: str, board: str = BOARD) -> int:
    return main(["extrinsics", "--board", board, "--calibrations", str(tmp_path / "a.yaml"),
                 str(tmp_path / "b.yaml"), "--images", str(pairs / "a"), str(pairs / "b"),
                 "--out", str(tmp_path / "ab.yaml"), *extra])


def test_camera_to_camera_pose_within_5_mm_and_half_a_degree(pairs: Path, tmp_path: Path) -> None:
    """The pose of A in B's frame matches the truth (5 mm, 0.5 deg) and agrees with the belt
    poses of both cameras, which the report states."""
    CameraCalibration("A", CAM_A, pose=POSE_A).save(tmp_path / "a.yaml")
    CameraCalibration("B", CAM_B, pose=POSE_B).save(tmp_path / "b.yaml")
    assert _run(pairs, tmp_path) == 0
    out = yaml.safe_load((tmp_path / "ab.yaml").read_text())
    got = Pose(np.array(out["pose_b_from_a"]["rotation"]),
               np.array(out["pose_b_from_a"]["translation_mm"]))
    truth = POSE_B.inverse().compose(POSE_A)
    dt, dr = pose_difference(got, truth)
    assert dt < 5.0
    assert dr < 0.5
    assert out["pairs_used"] == 6
    summary = yaml.safe_load((tmp_path / "ab-report" / "summary.yaml").read_text())
    assert summary["belt_consistency"]["translation_mm"] < 5.0
    assert (tmp_path / "ab-report" / "corners_b.png").exists()


def test_update_b_gives_b_its_belt_pose(pairs: Path, tmp_path: Path) -> None:
    """--update-b writes camera B's belt pose from A's: within 5 mm and 0.5 deg of the truth."""
    CameraCalibration("A", CAM_A, pose=POSE_A).save(tmp_path / "a.yaml")
    CameraCalibration("B", CAM_B).save(tmp_path / "b.yaml")
    assert _run(pairs, tmp_path, "--update-b") == 0
    b = load_camera_calibration(tmp_path / "b.yaml", serial="B")
    assert b.pose is not None
    dt, dr = pose_difference(b.pose, POSE_B)
    assert dt < 5.0
    assert dr < 0.5


def test_inconsistent_belt_poses_fail(pairs: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """When B's stored belt pose is 30 mm off, the command exits 1 and says to re-run belt."""
    CameraCalibration("A", CAM_A, pose=POSE_A).save(tmp_path / "a.yaml")
    off = Pose(POSE_B.rotation, POSE_B.translation_mm + np.array([30.0, 0.0, 0.0]))
    CameraCalibration("B", CAM_B, pose=off).save(tmp_path / "b.yaml")
    assert _run(pairs, tmp_path) == 1
    assert "re-run edge-calibrate belt" in capsys.readouterr().err


def test_bad_input(pairs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A chessboard spec or images without the board exit 2 with what to do."""
    CameraCalibration("A", CAM_A).save(tmp_path / "a.yaml")
    CameraCalibration("B", CAM_B).save(tmp_path / "b.yaml")
    assert _run(pairs, tmp_path, board="chessboard:9x6:25") == 2
    assert "needs a ChArUco board" in capsys.readouterr().err
    assert _run(pairs, tmp_path, board="charuco:5x3:40:30:DICT_5X5_50") == 2
    assert "no image pair shows the board to both cameras" in capsys.readouterr().err
