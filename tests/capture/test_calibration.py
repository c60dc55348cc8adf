"""The calibration YAML the node reads: round trip and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.capture.calibration import (
    CalibrationError,
    CameraCalibration,
    InspectionRegion,
    Quality,
    load_camera_calibration,
)
from edge.config import ConfigError
from edge.types import Intrinsics, Pose


def _calibration(serial: str = "123456789012") -> CameraCalibration:
    pose = Pose.look_at(np.array([10.0, -20.0, 900.0]), np.array([0.0, 0.0, 0.0]))
    return CameraCalibration(
        serial=serial,
        intrinsics=Intrinsics(640, 480, 615.2, 614.9, 321.1, 238.7, (0.1, -0.2, 0.001, 0.0, 0.05)),
        pose=pose, region=InspectionRegion(-400.0, 400.0, -300.0, 300.0),
        quality=Quality(0.21, 1.4, 0.97))


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    """What is saved is what the node loads: intrinsics, pose, region, quality, serial."""
    cal = _calibration()
    cal.save(tmp_path / "cam.yaml")
    back = load_camera_calibration(tmp_path / "cam.yaml", serial="123456789012",
                                   resolution=(640, 480))
    assert back.intrinsics == cal.intrinsics
    assert back.pose is not None
    assert cal.pose is not None
    np.testing.assert_allclose(back.pose.rotation, cal.pose.rotation)
    np.testing.assert_allclose(back.pose.translation_mm, cal.pose.translation_mm)
    assert back.region == cal.region
    assert back.quality == cal.quality
    text = (tmp_path / "cam.yaml").read_text()
    assert "'123456789012':" in text
    assert "calibrated_at" in text
    assert "tool_version" in text


@settings(max_examples=30, deadline=None)
@given(st.tuples(st.floats(-3.1, 3.1), st.floats(-3.1, 3.1), st.floats(-3.1, 3.1)),
       st.lists(st.floats(-2000, 2000), min_size=3, max_size=3))
def test_any_rigid_pose_survives_the_file(angles: tuple[float, float, float],
                                          t: list[float]) -> None:
    """Any rotation and translation is written and read back to 1e-9."""
    import tempfile

    import cv2
    R = cv2.Rodrigues(np.array(angles))[0]
    cal = _calibration().replace(pose=Pose(R, np.array(t)))
    with tempfile.TemporaryDirectory() as d:
        cal.save(Path(d) / "c.yaml")
        back = load_camera_calibration(Path(d) / "c.yaml")
    assert back.pose is not None
    np.testing.assert_allclose(back.pose.rotation, R, atol=1e-9)
    np.testing.assert_allclose(back.pose.translation_mm, t, atol=1e-9)


def test_other_serial_is_refused(tmp_path: Path) -> None:
    """A calibration of another camera raises an error naming both serials."""
    _calibration("111").save(tmp_path / "c.yaml")
    with pytest.raises(CalibrationError, match="for camera 111, not 222") as info:
        load_camera_calibration(tmp_path / "c.yaml", serial="222")
    assert isinstance(info.value, ConfigError)
    assert str(tmp_path / "c.yaml") in str(info.value)


def test_other_resolution_is_refused(tmp_path: Path) -> None:
    """A calibration made at 640x480 is refused for a 1280x720 stream."""
    _calibration().save(tmp_path / "c.yaml")
    with pytest.raises(CalibrationError, match=r"calibrated at 640x480.*1280x720"):
        load_camera_calibration(tmp_path / "c.yaml", resolution=(1280, 720))


def test_missing_file(tmp_path: Path) -> None:
    """A missing file says so and what makes it."""
    with pytest.raises(CalibrationError, match="does not exist; run edge-calibrate"):
        load_camera_calibration(tmp_path / "nope.yaml")


@pytest.mark.parametrize(("mutate", "key"), [
    (lambda d: d.update(format="other"), "format"),
    (lambda d: d["S"]["intrinsics"].pop("fx"), "S.intrinsics.fx"),
    (lambda d: d["S"]["intrinsics"].update(fx="wide"), "S.intrinsics.fx"),
    (lambda d: d["S"]["intrinsics"].update(distortion=[0, 0]), "S.intrinsics.distortion"),
    (lambda d: d["S"]["pose"].update(rotation=[[1, 0, 0], [0, 2, 0], [0, 0, 1]]),
     "S.pose.rotation"),
    (lambda d: d["S"]["inspection_region"].update(x_min_mm=500), "S.inspection_region"),
    (lambda d: d["S"]["quality"].update(fill_rate="full"), "S.quality.fill_rate"),
])
def test_corrupt_content_names_the_key(tmp_path: Path, mutate: object, key: str) -> None:
    """Each kind of damage to the file is reported with the key that holds it."""
    _calibration("S").save(tmp_path / "c.yaml")
    data = yaml.safe_load((tmp_path / "c.yaml").read_text())
    mutate(data)  # type: ignore[operator]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(CalibrationError) as info:
        load_camera_calibration(tmp_path / "c.yaml")
    assert info.value.key == key


def test_not_yaml(tmp_path: Path) -> None:
    """A file that is not YAML is refused with the line of the problem."""
    (tmp_path / "c.yaml").write_text("format: [unclosed\n")
    with pytest.raises(CalibrationError, match="not valid YAML"):
        load_camera_calibration(tmp_path / "c.yaml")
