"""The belt health check the node runs, and `edge-calibrate check --config`."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from calibration.check import check_board
from calibration.cli import main
from calibration.render import Box, DepthNoise, board_views, render_belt_depth, render_board
from edge.capture.calibration import CameraCalibration, Quality, load_camera_calibration
from edge.capture.recording import write_recording
from edge.perception.belt_check import (
    BeltChecker,
    BeltCheckThresholds,
    calibrated_thresholds,
    check_belt,
)
from edge.types import Frame, Intrinsics, Pose

from .conftest import CHARUCO, TRUE_CAMERA, belt_calibration_of, still_frames

CAMERA = Intrinsics(640, 480, 610.0, 610.0, 318.0, 243.0)
POSE = Pose.look_at(np.array([-200.0, 0.0, 1000.0]), np.array([0.0, 0.0, 0.0]))


def _tilted(pose: Pose, degrees: float) -> Pose:
    """The camera rotated about its own x axis (a knocked mount)."""
    R = cv2.Rodrigues(np.array([np.radians(degrees), 0.0, 0.0]))[0]
    return Pose(pose.rotation @ R, pose.translation_mm)


@pytest.fixture(scope="module")
def calibration() -> CameraCalibration:
    """A belt calibration of CAMERA at POSE made from a noisy empty-belt frame."""
    return belt_calibration_of(CAMERA, POSE)


def test_unchanged_camera_passes(calibration: CameraCalibration) -> None:
    """A new noisy frame of the same empty belt passes with drift < 1 mm and tilt < 0.2 deg."""
    depth = render_belt_depth(CAMERA, POSE, noise=DepthNoise(), seed=12)
    result = check_belt(calibration, depth, 0.001)
    assert result.passed, result.reasons
    assert result.drift_mm is not None
    assert abs(result.drift_mm) < 1.0
    assert result.tilt_deg is not None
    assert result.tilt_deg < 0.2
    assert result.fill_rate > 0.9


def test_items_on_the_belt_do_not_fail_the_check(calibration: CameraCalibration) -> None:
    """Boxes covering about a third of the region leave the plane estimate unchanged (checked
    the way the node does it, through a BeltChecker reused across frames)."""
    checker = BeltChecker(calibration)
    boxes = (Box(-150, 80, 300, 200, 150), Box(180, -120, 250, 250, 60), Box(60, 160, 120, 80, 15))
    depth = render_belt_depth(CAMERA, POSE, noise=DepthNoise(), seed=13, boxes=boxes)
    assert checker.check(render_belt_depth(CAMERA, POSE, noise=DepthNoise(), seed=3),
                         0.001).passed
    result = checker.check(depth, 0.001)
    assert result.passed, result.reasons
    assert result.drift_mm is not None
    assert abs(result.drift_mm) < 1.0
    assert result.belt_fraction is not None
    assert result.belt_fraction < 0.8


@pytest.mark.parametrize(("moved", "reason"), [
    (Pose(POSE.rotation, POSE.translation_mm + np.array([0.0, 0.0, 12.0])), "drifted -12"),
    (_tilted(POSE, 2.0), "tilted 2.0"),
])
def test_moved_camera_fails_with_the_measured_change(calibration: CameraCalibration, moved: Pose,
                                                     reason: str) -> None:
    """A camera raised 12 mm or tilted 2 deg fails, and the reason gives the measured change."""
    depth = render_belt_depth(CAMERA, moved, noise=DepthNoise(), seed=14)
    result = check_belt(calibration, depth, 0.001)
    assert not result.passed
    assert any(reason in r for r in result.reasons), result.reasons


def test_poor_depth_fails_on_fill_rate(calibration: CameraCalibration) -> None:
    """With 60 % of the depth pixels missing the check fails on the fill rate."""
    depth = render_belt_depth(CAMERA, POSE, noise=DepthNoise(dropout=0.6), seed=15)
    result = check_belt(calibration, depth, 0.001, BeltCheckThresholds(min_fill_rate=0.7))
    assert not result.passed
    assert "fill rate" in result.reasons[0]


def _bursty(pose: Pose, k: int) -> np.ndarray:
    """Depth frame k of the belt with a burst of dropouts over 3/8 of the image, in a
    different place in each frame."""
    depth = render_belt_depth(CAMERA, pose, noise=DepthNoise(), seed=40 + k)
    depth[:, k * 64 : k * 64 + 240] = 0
    return depth


def test_median_of_frames_ignores_dropout_bursts_but_not_a_moved_camera(
        calibration: CameraCalibration) -> None:
    """Ten frames, each with a burst of dropouts elsewhere: some fail alone on the fill rate,
    their median (what `edge-calibrate belt` fits) passes; the same from a camera raised
    12 mm fails on the drift."""
    checker = BeltChecker(calibration)
    frames = [_bursty(POSE, k) for k in range(10)]
    assert not all(checker.check(d, 0.001).passed for d in frames)
    result = checker.check_frames(frames, 0.001)
    assert result.passed, result.reasons
    assert result.fill_rate > 0.95
    raised = Pose(POSE.rotation, POSE.translation_mm + np.array([0.0, 0.0, 12.0]))
    moved = checker.check_frames([_bursty(raised, k) for k in range(10)], 0.001)
    assert not moved.passed
    assert any("drifted -12" in r for r in moved.reasons), moved.reasons


def test_a_belt_calibrated_at_low_fill_passes_the_check_at_that_fill(tmp_path: Path) -> None:
    """A dark belt where 43 % of the pixels never get depth: `edge-calibrate belt` accepts it
    (fill about 56 %, limit 50 %) and records the fill; the node's checker then passes new
    frames of it, where the fixed 70 % limit failed it with nothing changed."""
    never = np.random.default_rng(5).uniform(size=(480, 640)) < 0.43

    def dark(k: int) -> np.ndarray:
        depth = render_belt_depth(CAMERA, POSE, noise=DepthNoise(), seed=60 + k)
        depth[never] = 0
        return depth

    color = np.full((480, 640, 3), 90, np.uint8)
    write_recording(tmp_path / "dark.db3", [
        Frame("cam", k, 1000.0 + k * 1000.0 / 30, color, dark(k), 0.001, CAMERA)
        for k in range(10)], 30, serial="C1")
    assert main(["belt", "--recording", str(tmp_path / "dark.db3"), "--out",
                 str(tmp_path / "c1.yaml"), "--region", "600x500"]) == 0
    cal = load_camera_calibration(tmp_path / "c1.yaml", serial="C1", resolution=(640, 480))
    assert cal.quality.fill_rate is not None
    assert 0.5 < cal.quality.fill_rate < 0.6
    later = [dark(k) for k in range(20, 30)]
    result = BeltChecker(cal).check_frames(later, 0.001)
    assert result.passed, result.reasons
    fixed = BeltChecker(cal, BeltCheckThresholds()).check_frames(later, 0.001)
    assert not fixed.passed
    assert "fill rate" in fixed.reasons[0]


def test_the_calibrated_fill_limit_is_never_stricter_than_the_default() -> None:
    """A calibration with good fill (95 %) or none recorded keeps the default 70 % limit."""
    good = CameraCalibration("C1", CAMERA, quality=Quality(fill_rate=0.95))
    assert calibrated_thresholds(good).min_fill_rate == pytest.approx(0.7)
    assert calibrated_thresholds(CameraCalibration("C1", CAMERA)).min_fill_rate == (
        pytest.approx(0.7))


def test_other_resolution_fails_cleanly(calibration: CameraCalibration) -> None:
    """A depth frame of another size fails with a reason instead of raising."""
    result = check_belt(calibration, np.zeros((240, 320), np.uint16), 0.001)
    assert not result.passed
    assert "320x240" in result.reasons[0]


def test_board_reprojection_under_stored_intrinsics() -> None:
    """A board in view reprojects well under the right intrinsics and fails under a wrong lens
    distortion; with no board in view the board check passes (nothing to compare)."""
    from calibration.boards import parse_board
    spec = parse_board(CHARUCO)
    rvec, tvec = board_views(spec, TRUE_CAMERA, 4, seed=3)[3]  # near the image's edge
    image = render_board(spec, TRUE_CAMERA, rvec, tvec)
    good = check_board(CameraCalibration("X", TRUE_CAMERA), image, spec)
    assert good.found
    assert good.passed
    assert good.rms_px is not None
    assert good.rms_px < 0.5
    wrong = Intrinsics(640, 480, 600.0, 605.0, 322.5, 236.0, (0.1, 0.0, 0.0, 0.0, 0.0))
    bad = check_board(CameraCalibration("X", wrong), image, spec)
    assert bad.found
    assert not bad.passed
    empty = check_board(CameraCalibration("X", TRUE_CAMERA), np.full((480, 640), 128, np.uint8),
                        spec)
    assert not empty.found
    assert empty.passed


def _config(tmp_path: Path, recording: Path, calibration: Path) -> Path:
    cfg = {"cameras": [{"id": "top", "source": "recording", "recording": str(recording),
                        "calibration": str(calibration)}]}
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_check_command_passes_then_fails_after_the_camera_moves(
        calibration: CameraCalibration, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`edge-calibrate check --config` exits 0 on the calibrated view and 1 once the camera has
    been knocked, with a report either way (recordings played back by pyrealsense2)."""
    calibration.save(tmp_path / "c1.yaml")
    for name, pose, expected in (("same", POSE, 0), ("knocked", _tilted(POSE, 3.0), 1)):
        depth = render_belt_depth(CAMERA, pose, noise=DepthNoise(), seed=21)
        color = np.full((480, 640, 3), 90, np.uint8)
        write_recording(tmp_path / f"{name}.db3", still_frames(color, depth, CAMERA), 30,
                        serial="C1")
        config = _config(tmp_path, tmp_path / f"{name}.db3", tmp_path / "c1.yaml")
        report = tmp_path / f"report-{name}"
        assert main(["check", "--config", str(config), "--report", str(report)]) == expected
        summary = yaml.safe_load((report / "summary.yaml").read_text())
        assert summary["passed"] is (expected == 0)
        assert (report / "top_belt_residuals.png").exists()
    out = capsys.readouterr().out
    assert "PASS" in out
    assert "FAIL" in out
    assert "tilted" in out


def test_check_command_refuses_a_calibration_of_another_camera(
        calibration: CameraCalibration, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config pointing a camera at another camera's calibration exits 2 naming both serials."""
    calibration.replace(serial="OTHER").save(tmp_path / "c1.yaml")
    depth = render_belt_depth(CAMERA, POSE, seed=1)
    write_recording(tmp_path / "r.db3", still_frames(np.zeros((480, 640, 3), np.uint8), depth,
                                                     CAMERA), 30, serial="C1")
    config = _config(tmp_path, tmp_path / "r.db3", tmp_path / "c1.yaml")
    assert main(["check", "--config", str(config), "--report", str(tmp_path / "r")]) == 2
    assert "for camera OTHER, not C1" in capsys.readouterr().err


def test_check_command_on_the_synthetic_conveyor(tmp_path: Path) -> None:
    """Calibrate both synthetic cameras from recordings of the empty belt, then check the live
    synthetic conveyor (items running) through the node's own config: both pass."""
    from edge.catalogue import load_catalogue
    from edge.config import config_from_mapping
    from edge.sim.conveyor import SyntheticConveyor

    empty = config_from_mapping({"synthetic": {"items_per_second": 0, "seed": 3}})
    world = SyntheticConveyor(empty.synthetic, empty.belt, empty.cameras, load_catalogue(), 0.0)
    cameras = []
    for cam in world.camera_ids:
        rec = tmp_path / f"{cam}.db3"
        write_recording(rec, (world.render(cam, i) for i in range(3)), 30, serial=cam)
        assert main(["belt", "--recording", str(rec), "--out", str(tmp_path / f"{cam}.yaml"),
                     "--travel-image", "right"]) == 0
        cameras.append({"id": cam, "calibration": str(tmp_path / f"{cam}.yaml")})
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"synthetic": {"items_per_second": 6.0, "seed": 3},
                                      "cameras": cameras}))
    assert main(["check", "--config", str(config)]) == 0
    summary = yaml.safe_load((tmp_path / "calibration-check-report" / "summary.yaml").read_text())
    assert set(summary["cameras"]) == set(world.camera_ids)
    assert all(c["belt"]["tilt_deg"] < 0.1 for c in summary["cameras"].values())


def test_check_command_judges_the_median_of_frames_like_the_node(
        calibration: CameraCalibration, tmp_path: Path) -> None:
    """`edge-calibrate check` agrees with the node's start-up check: a recording whose frames
    each lose a different 3/8 of the depth passes (its first frame alone failed on the fill
    rate), and the summary names the fill limit it used."""
    calibration.save(tmp_path / "c1.yaml")
    color = np.full((480, 640, 3), 90, np.uint8)
    # The first frame's burst lies across the inspection region's middle.
    frames = [Frame("cam", i, 1000.0 + i * 1000.0 / 30, color, _bursty(POSE, (i + 4) % 10),
                    0.001, CAMERA) for i in range(10)]
    assert not BeltChecker(calibration).check(frames[0].depth, 0.001).passed
    write_recording(tmp_path / "bursty.db3", frames, 30, serial="C1")
    config = _config(tmp_path, tmp_path / "bursty.db3", tmp_path / "c1.yaml")
    assert main(["check", "--config", str(config), "--report", str(tmp_path / "r")]) == 0
    summary = yaml.safe_load((tmp_path / "r" / "summary.yaml").read_text())
    assert summary["thresholds"]["min_fill_rate"] == {"top": 0.7}
    assert main(["check", "--config", str(config), "--report", str(tmp_path / "r2"),
                 "--min-fill-rate", "0.55"]) == 0
    named = yaml.safe_load((tmp_path / "r2" / "summary.yaml").read_text())
    assert named["thresholds"]["min_fill_rate"] == {"top": 0.55}  # the engineer's limit
