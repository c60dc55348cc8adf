"""`edge-calibrate` command-line behaviour shared by all commands: exit codes and messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from calibration.cli import main


@pytest.mark.parametrize("argv", [
    ["belt", "--camera", "000000000000", "--out", "x.yaml"],
    ["intrinsics", "--camera", "000000000000", "--board", "chessboard:9x6:25", "--out", "x.yaml",
     "--max-seconds", "5"],
])
def test_live_camera_absent_is_a_clear_error(argv: list[str], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """With no RealSense connected, --camera exits 2 saying the camera cannot be opened (real
    pyrealsense2; the capture itself is untested here for want of a camera)."""
    argv = [a if a != "x.yaml" else str(tmp_path / "x.yaml") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "camera 000000000000: cannot open it" in err
    assert "Traceback" not in err


def test_check_without_calibrated_cameras(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A node config whose cameras have no calibration file exits 2 and says what to set."""
    (tmp_path / "node.yaml").write_text(yaml.safe_dump({"cameras": [{"id": "top"}]}))
    assert main(["check", "--config", str(tmp_path / "node.yaml")]) == 2
    assert "cameras[].calibration" in capsys.readouterr().err


def test_check_with_a_broken_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A config the node would refuse is refused here with the node's key path."""
    (tmp_path / "node.yaml").write_text("cameras:\n  - id: top\n    calibration: /nope.yaml\n")
    assert main(["check", "--config", str(tmp_path / "node.yaml")]) == 2
    assert "cameras[0].calibration" in capsys.readouterr().err


def test_no_command_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    """Running without a command exits 2 with the usage listing the commands."""
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "usage: edge-calibrate" in err


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    """--help exits 0 and names intrinsics, belt, extrinsics and check."""
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("intrinsics", "belt", "extrinsics", "check"):
        assert command in out
