"""Belt plane, travel direction and camera pose, on rendered depth with RealSense-like noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from calibration.belt import (
    find_markers,
    fit_belt_plane,
    inspection_region,
    intersect_plane,
    travel_from_track,
)
from calibration.cli import main
from calibration.render import DepthNoise, render_belt_color, render_belt_depth
from edge.capture.calibration import load_camera_calibration
from edge.capture.recording import write_recording
from edge.catalogue import load_catalogue
from edge.config import config_from_mapping
from edge.perception.plane_fit import BeltFitError, Plane, angle_deg, ransac_plane
from edge.sim.conveyor import SyntheticConveyor
from edge.types import Frame, Intrinsics, Pose

CAMERA = Intrinsics(640, 480, 610.0, 610.0, 318.0, 243.0)
POSES = {
    "top-down": Pose.look_at(np.array([0.0, 0.0, 900.0]), np.array([0.0, 0.0, 0.0])),
    "oblique": Pose.look_at(np.array([-250.0, -500.0, 1000.0]), np.array([80.0, 0.0, 0.0])),
    "rolled": Pose.look_at(np.array([100.0, 120.0, 1200.0]), np.array([0.0, 0.0, 0.0]),
                           up=np.array([1.0, 0.4, 0.0])),
}


def true_plane(pose: Pose) -> Plane:
    """The belt plane z = 0 in the camera frame of `pose`."""
    return Plane(pose.rotation[2, :], float(pose.translation_mm[2]))


@pytest.mark.parametrize("name", list(POSES))
def test_plane_within_half_a_degree_and_2_mm_under_noise(name: str) -> None:
    """The fitted normal is within 0.5 deg and the offset within 2 mm of the truth under D435-like
    noise, with the floor beside a 700 mm belt in view."""
    pose = POSES[name]
    depth = render_belt_depth(CAMERA, pose, noise=DepthNoise(), belt_width_mm=700.0, seed=4)
    fit = fit_belt_plane(depth, 0.001, CAMERA)
    truth = true_plane(pose)
    assert angle_deg(fit.plane.normal, truth.normal) < 0.5
    assert abs(fit.plane.offset_mm - truth.offset_mm) < 2.0
    assert 0.9 < fit.fill_rate < 0.99  # 2 % dropout and the invalid left band
    z = float(np.nanmedian(depth[depth > 0]))
    assert fit.residual_rms_mm == pytest.approx(DepthNoise().sigma_mm(np.array(z), 610.0),
                                                rel=0.5)


@settings(max_examples=25, deadline=None)
@given(st.floats(-0.4, 0.4), st.floats(-0.4, 0.4), st.floats(300.0, 2000.0),
       st.floats(0.0, 0.45), st.integers(0, 2**16))
def test_ransac_ignores_up_to_45_percent_clutter(nx: float, ny: float, d: float,
                                                 clutter: float, seed: int) -> None:
    """RANSAC recovers a plane from points with 1 mm noise when up to 45 % are off-plane clutter."""
    rng = np.random.default_rng(seed)
    n = np.array([nx, ny, -1.0])
    n /= np.linalg.norm(n)
    basis = np.linalg.svd(n[None, :])[2][1:]
    pts = (rng.uniform(-500, 500, (4000, 2)) @ basis) - d * n
    pts += rng.normal(0, 1.0, (4000, 1)) * n
    k = int(clutter * len(pts))
    pts[:k] += rng.uniform(20, 300, (k, 1)) * n * np.sign(rng.uniform(-1, 1, (k, 1)))
    plane, _ = ransac_plane(pts, seed=seed)
    assert angle_deg(plane.normal, -n if plane.offset_mm < 0 else n) < 0.5 or angle_deg(
        plane.normal, -n) < 0.5
    assert abs(abs(plane.offset_mm) - d) < 2.0


def test_travel_and_pose_from_two_markers() -> None:
    """Two ArUco markers on the belt give the travel axis; the pose matches the truth."""
    pose = POSES["oblique"]
    depth = render_belt_depth(CAMERA, pose, noise=DepthNoise(), seed=1)
    color = render_belt_color(CAMERA, pose, ((3, -120.0, 30.0), (7, 220.0, 30.0)))
    fit = fit_belt_plane(depth, 0.001, CAMERA)
    found = find_markers(color)
    assert set(found) == {3, 7}
    pts = intersect_plane(np.array([found[3], found[7]]), CAMERA, fit.plane)
    travel = travel_from_track(list(pts), fit.plane)
    got, region = inspection_region(fit, CAMERA, travel)
    angle = np.degrees(np.arccos(np.clip((np.trace(got.rotation @ pose.rotation.T) - 1) / 2, -1,
                                         1)))
    assert angle < 0.5
    # the camera's height and the belt frame's origin lie on the belt, inside the region
    assert got.translation_mm[2] == pytest.approx(pose.translation_mm[2], abs=2.0)
    assert region.x_min_mm < 0 < region.x_max_mm
    assert region.y_min_mm < 0 < region.y_max_mm


def test_marker_track_gives_travel_in_time_order() -> None:
    """A marker moved downstream gives +x; the same track reversed gives -x."""
    plane = Plane(np.array([0.0, 0.0, -1.0]), 900.0)
    track = [np.array([x, 5.0 + 0.5 * np.sin(x), 900.0]) for x in np.linspace(-200, 200, 9)]
    assert angle_deg(travel_from_track(track, plane), np.array([1.0, 0, 0])) < 0.5
    assert angle_deg(travel_from_track(track[::-1], plane), np.array([-1.0, 0, 0])) < 0.5
    with pytest.raises(BeltFitError, match="at least 20 cm"):
        travel_from_track(track[4:6], plane)


def _synthetic_recording(path: Path, frames: int = 5) -> tuple[Pose, Intrinsics]:
    cfg = config_from_mapping({"synthetic": {"items_per_second": 0, "seed": 3}})
    world = SyntheticConveyor(cfg.synthetic, cfg.belt, cfg.cameras, load_catalogue(), 0.0)
    write_recording(path, (world.render("top", i) for i in range(frames)), 30, serial="TOP1")
    return world.camera_pose("top"), world.intrinsics("top")


def test_belt_command_on_a_synthetic_recording(tmp_path: Path) -> None:
    """`edge-calibrate belt --recording` (pyrealsense2 playback of the synthetic conveyor's empty
    belt) writes the camera's true pose, factory intrinsics, quality figures and a report."""
    true_pose, intr = _synthetic_recording(tmp_path / "top.db3")
    out = tmp_path / "top.yaml"
    assert main(["belt", "--recording", str(tmp_path / "top.db3"), "--out", str(out),
                 "--travel-image", "right", "--frames", "5"]) == 0
    cal = load_camera_calibration(out, serial="TOP1", resolution=(640, 480))
    assert cal.intrinsics == intr
    assert cal.intrinsics_source == "factory"
    assert cal.pose is not None
    assert cal.region is not None
    assert angle_deg(cal.pose.rotation[2], true_pose.rotation[2]) < 0.5
    assert angle_deg(cal.pose.rotation[0], true_pose.rotation[0]) < 0.5
    assert cal.pose.translation_mm[2] == pytest.approx(true_pose.translation_mm[2], abs=2.0)
    assert cal.quality.fill_rate is not None
    assert cal.quality.fill_rate > 0.9
    assert cal.quality.belt_residual_rms_mm is not None
    assert cal.quality.belt_residual_rms_mm < 5
    report = tmp_path / "top-report"
    assert yaml.safe_load((report / "summary.yaml").read_text())["saved"] == str(out)
    assert (report / "belt_residuals.png").stat().st_size > 5_000
    assert (report / "belt_view.png").stat().st_size > 5_000


def test_belt_command_with_markers_and_calibrated_intrinsics(tmp_path: Path) -> None:
    """With --travel-markers and --intrinsics, the pose follows the markers and the file keeps
    the calibrated intrinsics."""
    pose = POSES["rolled"]
    color = render_belt_color(CAMERA, pose, ((0, -200.0, -40.0), (1, 200.0, -40.0)))
    frames = [Frame("c", i, 33.0 * i, color, render_belt_depth(CAMERA, pose, noise=DepthNoise(),
                                                               seed=i), 0.001, CAMERA)
              for i in range(3)]
    write_recording(tmp_path / "m.db3", frames, 30, serial="M1")
    from edge.capture.calibration import CameraCalibration, Quality
    CameraCalibration("M1", CAMERA, quality=Quality(0.2)).save(tmp_path / "intr.yaml")
    out = tmp_path / "m.yaml"
    assert main(["belt", "--recording", str(tmp_path / "m.db3"), "--out", str(out),
                 "--intrinsics", str(tmp_path / "intr.yaml"), "--travel-markers", "0,1",
                 "--region", "600x400"]) == 0
    cal = load_camera_calibration(out)
    assert cal.pose is not None
    assert cal.intrinsics_source == "calibrated"
    assert cal.quality.rms_reprojection_px == 0.2
    assert angle_deg(cal.pose.rotation[0], pose.rotation[0]) < 0.5
    assert angle_deg(cal.pose.rotation[2], pose.rotation[2]) < 0.5
    assert cal.region is not None
    assert cal.region.x_max_mm == pytest.approx(300.0)


@pytest.mark.parametrize(("args", "needle"), [
    (["--recording", "missing.db3"], "no such file"),
    (["--travel-markers", "5,6"], "not found in the colour image"),
])
def test_belt_bad_input(args: list[str], needle: str, tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    """A missing recording or absent markers exit 2 with a message, no traceback."""
    _synthetic_recording(tmp_path / "top.db3", frames=2)
    argv = ["belt", "--out", str(tmp_path / "o.yaml")]
    if "--recording" not in args:
        argv += ["--recording", str(tmp_path / "top.db3")]
    else:
        args = ["--recording", str(tmp_path / args[1])]
    assert main(argv + args) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert "Traceback" not in err


unit = st.floats(-1.0, 1.0)


@settings(max_examples=50, deadline=None)
@given(st.tuples(unit, unit, st.floats(-1.0, -0.2)), st.tuples(unit, unit, unit),
       st.floats(200.0, 3000.0), st.tuples(st.floats(-500, 500), st.floats(-500, 500)))
def test_belt_pose_is_a_proper_rigid_transform(normal: tuple[float, float, float],
                                               travel: tuple[float, float, float], height: float,
                                               origin_xy: tuple[float, float]) -> None:
    """For any plane and travel direction, the belt pose is a rotation (det +1) whose z axis is
    the plane normal, whose x axis is the travel projected on the belt, and which puts the origin
    on the plane and the camera `height` above it."""
    from hypothesis import assume

    from calibration.belt import belt_pose
    n = -np.array(normal) / np.linalg.norm(normal)  # towards the camera
    t = np.array(travel)
    t_in = t - np.dot(t, n) * n
    assume(np.linalg.norm(t_in) > 0.1)
    plane = Plane(n, height)
    origin = np.array([origin_xy[0], origin_xy[1], 0.0]) - plane.heights(
        np.array([[origin_xy[0], origin_xy[1], 0.0]]))[0] * n
    pose = belt_pose(plane, t, origin)
    R = pose.rotation
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-9)
    assert np.linalg.det(R) == pytest.approx(1.0)
    np.testing.assert_allclose(R[2], n, atol=1e-9)
    assert angle_deg(R[0], t_in) < 1e-4
    assert pose.apply(origin)[2] == pytest.approx(0.0, abs=1e-6)
    assert pose.translation_mm[2] == pytest.approx(height, rel=1e-9)


def test_edge_node_synth_record_then_edge_calibrate_belt(tmp_path: Path) -> None:
    """End to end with the real scripts: `edge-node synth record` writes an empty-belt .db3 and
    `edge-calibrate belt --recording` recovers the synthetic top camera's pose from it."""
    import subprocess
    import sys

    from edge.sim.conveyor import default_pose

    bin_dir = Path(sys.executable).parent
    rec = tmp_path / "top.db3"
    subprocess.run([str(bin_dir / "edge-node"), "synth", "record", "--out", str(rec),
                    "--seconds", "0.2", "--seed", "5", "--camera", "top",
                    "--items-per-second", "0"], check=True, capture_output=True, timeout=120)
    proc = subprocess.run([str(bin_dir / "edge-calibrate"), "belt", "--recording", str(rec),
                           "--out", str(tmp_path / "top.yaml"), "--travel-image", "right"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "residual RMS" in proc.stdout
    cal = load_camera_calibration(tmp_path / "top.yaml", serial="top")
    truth = default_pose(0)
    assert cal.pose is not None
    assert angle_deg(cal.pose.rotation[2], truth.rotation[2]) < 0.5
    assert cal.pose.translation_mm[2] == pytest.approx(truth.translation_mm[2], abs=2.0)
