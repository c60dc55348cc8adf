"""`inspect`, `thresholds fit` and `engines` as a user runs them (through `edge.infer.cli.main`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from edge.infer.cli import main
from edge.infer.golden import GoldenSet


def _write_item(golden: GoldenSet, label: str, folder: Path) -> tuple[Path, Path, str]:
    i = golden.labels.index(label)
    rec = golden.records[i]
    crop = rec.crops["top"]
    rgb, depth = folder / f"{label}.png", folder / f"{label}_h.png"
    cv2.imwrite(str(rgb), crop.color)
    cv2.imwrite(str(depth), np.round(crop.height_mm * 10).astype(np.uint16))
    return rgb, depth, str(rec.product_id)


def _inspect(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
    assert main(["inspect", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_inspect_json_with_depth_and_product(golden: GoldenSet, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """RGB + depth + product: all three checks run; a crushed item is sidelined with reasons.

    (The golden hole of the retrained set shows mostly in the oblique view; from the top
    photograph alone the gallery catches it, not the classifier.)"""
    rgb, depth, product = _write_item(golden, "crush", tmp_path)
    out = _inspect(capsys, "--rgb", str(rgb), "--depth", str(depth), "--product", product)
    assert out["decision"] == "sideline"
    assert "damage" in out["reasons"]  # type: ignore[operator]
    assert out["damage_score"] > 0.5  # type: ignore[operator]
    assert out["geometry_score"] is not None
    assert out["anomaly_score"] is not None
    assert out["has_depth"] is True
    assert out["inputs"] == "full"


def test_inspect_json_rgb_only_degrades_and_says_so(golden: GoldenSet, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Without depth the classifier runs on RGB, geometry is skipped and the output says so."""
    rgb, _, _ = _write_item(golden, "none", tmp_path)
    out = _inspect(capsys, "--rgb", str(rgb))
    assert out["decision"] == "pass"
    assert out["geometry_score"] is None
    assert out["has_depth"] is False
    assert "no_depth" in out["reasons"]  # type: ignore[operator]
    assert any("no depth" in n for n in out["notes"])  # type: ignore[attr-defined]


def test_inspect_finds_the_item_in_a_larger_photo(golden: GoldenSet, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A rotated item on a plain background in a bigger photo is found and rectified."""
    crop = golden.records[golden.labels.index("none")].crops["top"]
    canvas = np.full((480, 640, 3), (60, 60, 60), np.uint8)
    ys, xs = np.nonzero(crop.mask)
    item = crop.color[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    big = cv2.resize(item, None, fx=2.0, fy=2.0)
    m = cv2.getRotationMatrix2D((big.shape[1] / 2, big.shape[0] / 2), 30, 1.0)
    rotated = cv2.warpAffine(big, m, (big.shape[1], big.shape[0]), borderValue=(60, 60, 60))
    y0, x0 = 240 - rotated.shape[0] // 2, 320 - rotated.shape[1] // 2
    canvas[y0:y0 + rotated.shape[0], x0:x0 + rotated.shape[1]] = rotated
    path = tmp_path / "photo.jpg"
    cv2.imwrite(str(path), canvas)
    out = _inspect(capsys, "--rgb", str(path), "--product", "P-BOX-S")
    assert out["item_found"] is True
    assert isinstance(out["damage_score"], float)


def test_inspect_human_output_and_errors(golden: GoldenSet, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Plain output shows the decision; a missing file or unknown product exits 2 with a message."""
    rgb, _, _ = _write_item(golden, "none", tmp_path)
    assert main(["inspect", "--rgb", str(rgb)]) == 0
    assert "decision:" in capsys.readouterr().out
    assert main(["inspect", "--rgb", str(tmp_path / "nope.png")]) == 2
    assert "nope.png: missing or not an image" in capsys.readouterr().err
    assert main(["inspect", "--rgb", str(rgb), "--product", "P-NOPE"]) == 2
    assert "P-BOX-S" in capsys.readouterr().err


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ds") / "val"
    subprocess.run([sys.executable, "-m", "edge.cli", "synth", "dataset", "--out", str(out),
                    "--items", "40", "--seed", "901", "--damage-rate", "0.3",
                    "--references", "1"], check=True, capture_output=True)
    return out


def test_thresholds_fit_writes_a_versioned_threshold(small_dataset: Path, engines_copy: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`thresholds fit` picks a nominal-quantile threshold and versions it in the manifest."""
    manifest = engines_copy / "manifest.yaml"
    before = yaml.safe_load(manifest.read_text())["thresholds"]
    argv = ["thresholds", "fit", "--data", str(small_dataset), "--target-fpr", "0.05",
            "--manifest", str(manifest)]
    assert main([*argv, "--dry-run"]) == 0
    assert yaml.safe_load(manifest.read_text())["thresholds"] == before
    capsys.readouterr()
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    after = yaml.safe_load(manifest.read_text())["thresholds"]
    assert after["version"] == summary["version"] != before["version"]
    assert after["target_fpr"] == 0.05
    assert after["fitted_on"] == str(small_dataset)
    assert set(after["fused"]) == {"full", "no_gallery", "no_depth", "classifier_only"}
    assert yaml.safe_load(manifest.read_text())["models"]  # the rest is untouched


def test_engines_commands_without_tensorrt_say_so(engines_copy: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Here (no TensorRT) `engines list` exits 2 explaining that TensorRT is needed."""
    try:
        import edge.infer.tensorrt  # noqa: F401
    except ImportError:
        code = main(["engines", "list", "--manifest", str(engines_copy / "manifest.yaml"),
                     "--cache", str(tmp_path / "plans")])
        assert code == 2
        assert "TensorRT is not installed" in capsys.readouterr().err
    else:
        pytest.skip("TensorRT is installed: covered by the real engine tests")
