"""`edge-calibrate intrinsics`: rendered boards with known truth, real photographs, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from calibration.boards import parse_board
from calibration.cli import main
from calibration.render import board_views, render_board
from edge.capture.calibration import load_camera_calibration
from edge.capture.recording import write_recording
from edge.types import Intrinsics

from .conftest import CHARUCO, CHESSBOARD, TRUE_CAMERA, render_views, still_frames

OPENCV_SAMPLES = Path(__file__).parent / "data" / "opencv_samples"
#: OpenCV's Python calibration tutorial, left01..left14.jpg (9x6 inner corners).
OPENCV_REFERENCE = {"fx": 534.07, "fy": 534.12, "cx": 341.53, "cy": 232.95}


def _calibrate(images: Path, board: str, out: Path, *extra: str) -> int:
    return main(["intrinsics", "--images", str(images), "--board", board, "--out", str(out),
                 "--serial", "SN1", *extra])


@pytest.mark.parametrize("board", [CHESSBOARD, CHARUCO])
def test_recovers_the_true_camera(board: str, request: pytest.FixtureRequest,
                                  tmp_path: Path) -> None:
    """fx, fy within 0.5 %, cx, cy within 2 px and RMS < 0.3 px on noise-free renders."""
    images = request.getfixturevalue("chessboard_dir" if board == CHESSBOARD else "charuco_dir")
    assert _calibrate(images, board, tmp_path / "cam.yaml") == 0
    cal = load_camera_calibration(tmp_path / "cam.yaml", serial="SN1", resolution=(640, 480))
    got, true = cal.intrinsics, TRUE_CAMERA
    assert got.fx == pytest.approx(true.fx, rel=0.005)
    assert got.fy == pytest.approx(true.fy, rel=0.005)
    assert abs(got.cx - true.cx) < 2.0
    assert abs(got.cy - true.cy) < 2.0
    assert cal.quality.rms_reprojection_px is not None
    assert cal.quality.rms_reprojection_px < 0.3
    assert got.coeffs[0] == pytest.approx(true.coeffs[0], abs=0.02)


def test_report_has_summary_and_images(chessboard_dir: Path, tmp_path: Path) -> None:
    """The report holds summary.yaml/.json with per-view RMS and coverage, and the PNGs."""
    assert _calibrate(chessboard_dir, CHESSBOARD, tmp_path / "cam.yaml") == 0
    report = tmp_path / "cam-report"
    summary = yaml.safe_load((report / "summary.yaml").read_text())
    assert summary == json.loads((report / "summary.json").read_text())
    assert len(summary["views"]) == 12
    assert all(v["rms_px"] < 0.3 for v in summary["views"])
    assert set(summary["coverage"]) == {"x", "y", "size", "skew"}
    assert "RMS" in summary["metric"]
    for png in ("corners.png", "reprojection_errors.png"):
        assert (report / png).stat().st_size > 10_000


def test_refuses_to_save_above_max_rms_unless_forced(chessboard_dir: Path,
                                                     tmp_path: Path) -> None:
    """Above --max-rms nothing is saved and the exit code is 1; --force saves."""
    out = tmp_path / "cam.yaml"
    assert _calibrate(chessboard_dir, CHESSBOARD, out, "--max-rms", "0.01") == 1
    assert not out.exists()
    assert _calibrate(chessboard_dir, CHESSBOARD, out, "--max-rms", "0.01", "--force") == 0
    assert out.exists()


def test_outlier_view_is_rejected(chessboard_dir: Path, tmp_path: Path) -> None:
    """A view taken with another lens (a mixed-up file) is dropped as an outlier; the rest
    calibrate to the truth."""
    images = tmp_path / "imgs"
    shutil.copytree(chessboard_dir, images)
    other = Intrinsics(640, 480, 450.0, 450.0, 300.0, 250.0, (0.35, 0.0, 0.0, 0.0, 0.0))
    spec = parse_board(CHESSBOARD)
    rvec, tvec = board_views(spec, other, 1, seed=9)[0]
    cv2.imwrite(str(images / "view99.png"), render_board(spec, other, rvec, tvec))
    assert _calibrate(images, CHESSBOARD, tmp_path / "cam.yaml") == 0
    summary = yaml.safe_load((tmp_path / "cam-report" / "summary.yaml").read_text())
    assert "view99.png" in summary["rejected"]
    cal = load_camera_calibration(tmp_path / "cam.yaml")
    assert cal.intrinsics.fx == pytest.approx(TRUE_CAMERA.fx, rel=0.005)


@pytest.mark.parametrize(("case", "needle"), [
    ("missing folder", "no such folder"),
    ("empty folder", "no images"),
    ("wrong board", "check --board"),
    ("too few views", "only 3 usable view(s), at least 6"),
    ("blurred", "blurred"),
])
def test_bad_input_gives_a_clear_message(case: str, needle: str, chessboard_dir: Path,
                                         tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    """Bad input exits 2 with one line saying what to do, never a traceback."""
    images = tmp_path / "imgs"
    board = CHESSBOARD
    if case == "empty folder":
        images.mkdir()
        (images / "notes.txt").write_text("no pictures")
    elif case == "wrong board":
        images, board = chessboard_dir, "chessboard:8x6:25"
    elif case == "too few views":
        images.mkdir()
        for p in sorted(chessboard_dir.iterdir())[:3]:
            shutil.copy(p, images)
    elif case == "blurred":
        render_views(parse_board(CHESSBOARD), images, 8, seed=5, blur_px=3.0)
    assert _calibrate(images, board, tmp_path / "cam.yaml") == 2
    err = capsys.readouterr().err
    assert needle in err
    assert "Traceback" not in err
    assert not (tmp_path / "cam.yaml").exists()


def test_wrong_board_spec_text_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A malformed --board exits 2 with the expected format."""
    argv = ["intrinsics", "--images", ".", "--board", "chessboard:9x6", "--out", "x.yaml"]
    assert main(argv) == 2
    assert "chessboard:COLSxROWS:SQUARE_MM" in capsys.readouterr().err


def test_installed_script_reports_errors_without_traceback(tmp_path: Path) -> None:
    """The real `edge-calibrate` console script exits 2 with a message for an empty folder."""
    script = Path(sys.executable).parent / "edge-calibrate"
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([str(script), "intrinsics", "--images", str(tmp_path / "empty"),
                           "--board", CHESSBOARD, "--out", str(tmp_path / "c.yaml"),
                           "--serial", "1"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 2
    assert "no images" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_compare_factory_reads_a_recordings_intrinsics(chessboard_dir: Path,
                                                       tmp_path: Path) -> None:
    """--compare-factory --factory-from FILE.db3 reports the distance to the stream's intrinsics
    and takes the serial from the recording (real pyrealsense2 playback)."""
    frames = still_frames(np.zeros((480, 640, 3), np.uint8), np.zeros((480, 640), np.uint16),
                          TRUE_CAMERA)
    write_recording(tmp_path / "f.db3", frames, 30, serial="FACTORY1")
    assert main(["intrinsics", "--images", str(chessboard_dir), "--board", CHESSBOARD,
                 "--out", str(tmp_path / "cam.yaml"), "--compare-factory",
                 "--factory-from", str(tmp_path / "f.db3")]) == 0
    summary = yaml.safe_load((tmp_path / "cam-report" / "summary.yaml").read_text())
    diff = summary["factory_difference"]
    assert abs(diff["fx_percent"]) < 0.5
    assert abs(diff["cx_px"]) < 2.0
    assert diff["max_displacement_px"] < 3.0
    assert load_camera_calibration(tmp_path / "cam.yaml", serial="FACTORY1")


@pytest.mark.skipif(not OPENCV_SAMPLES.is_dir(), reason="OpenCV sample photographs not present")
def test_real_photographs_match_the_published_reference(tmp_path: Path) -> None:
    """OpenCV's left01..14.jpg calibrate to within 1 % / 3 px of the tutorial's result."""
    assert _calibrate(OPENCV_SAMPLES, "chessboard:9x6:25", tmp_path / "left.yaml") == 0
    cal = load_camera_calibration(tmp_path / "left.yaml")
    i = cal.intrinsics
    assert i.fx == pytest.approx(OPENCV_REFERENCE["fx"], rel=0.01)
    assert i.fy == pytest.approx(OPENCV_REFERENCE["fy"], rel=0.01)
    assert abs(i.cx - OPENCV_REFERENCE["cx"]) < 3.0
    assert abs(i.cy - OPENCV_REFERENCE["cy"]) < 3.0
    assert cal.quality.rms_reprojection_px is not None
    assert cal.quality.rms_reprojection_px < 0.3


def test_recalibrating_keeps_the_belt_pose(chessboard_dir: Path, tmp_path: Path) -> None:
    """Re-running intrinsics into a file that already holds this camera's belt pose keeps the
    pose and region (the node keeps working) and updates the intrinsics."""
    from edge.capture.calibration import CameraCalibration, InspectionRegion
    from edge.types import Pose
    out = tmp_path / "cam.yaml"
    pose = Pose.look_at(np.array([0.0, 0.0, 900.0]), np.array([0.0, 0.0, 0.0]))
    CameraCalibration("SN1", Intrinsics(640, 480, 500.0, 500.0, 320.0, 240.0), pose=pose,
                      region=InspectionRegion(-1.0, 1.0, -1.0, 1.0)).save(out)
    assert _calibrate(chessboard_dir, CHESSBOARD, out) == 0
    cal = load_camera_calibration(out, serial="SN1")
    assert cal.pose is not None
    assert cal.region is not None
    np.testing.assert_allclose(cal.pose.rotation, pose.rotation)
    assert cal.intrinsics.fx == pytest.approx(TRUE_CAMERA.fx, rel=0.005)
