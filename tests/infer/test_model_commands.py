"""`inspect`, `thresholds fit` and `engines` as a user runs them (`edge.commands.main`)."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from edge.catalogue import load_catalogue
from edge.commands.models import main
from edge.config import ModelsConfig
from edge.infer.golden import GoldenSet, golden_scores, golden_self_test, load_golden
from edge.infer.inspector import ItemInspector
from edge.infer.manifest import sha256_file


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
    """RGB + depth + product: all three checks run; a crushed item is sidelined with reasons
    (from the top photograph and its depth, the dent in the top face carries it)."""
    rgb, depth, product = _write_item(golden, "crush", tmp_path)
    out = _inspect(capsys, "--rgb", str(rgb), "--depth", str(depth), "--product", product)
    assert out["decision"] == "sideline"
    assert "geometry" in out["reasons"]  # type: ignore[operator]  # the dent, in depth
    assert out["geometry_score"] > 1.0  # type: ignore[operator]  # deeper than 25 mm
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
    subprocess.run([sys.executable, "-m", "edge", "synth", "dataset", "--out", str(out),
                    "--items", "40", "--seed", "901", "--damage-rate", "0.3",
                    "--references", "1"], check=True, capture_output=True)
    return out


def test_thresholds_fit_writes_a_versioned_threshold(small_dataset: Path, engines_copy: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`thresholds fit` picks a nominal-quantile threshold and versions it in the manifest."""
    manifest = engines_copy / "manifest.yaml"
    before = yaml.safe_load(manifest.read_text())["thresholds"]
    golden_file = engines_copy / "golden" / "golden.npz"
    golden_before = golden_file.read_bytes()
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
    # Thresholds are not part of the golden comparison: the golden set stays as it was.
    assert golden_file.read_bytes() == golden_before
    assert summary["golden"]["recomputed"] == []


def _golden_named_by(manifest: Path) -> Path:
    """The golden file `manifest` names, checked against the sha256 it records."""
    golden = yaml.safe_load(manifest.read_text())["golden"]
    path = manifest.parent / str(golden["file"])
    assert path.is_file(), path
    assert sha256_file(path) == golden["sha256"], path
    return path


def _arrays(npz: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(npz), allow_pickle=False) as d:
        return {k: d[k] for k in d.files}


def test_thresholds_fit_refit_fusion_keeps_the_golden_self_test_passing(
        small_dataset: Path, engines_copy: Path, models_cfg: ModelsConfig,
        capsys: pytest.CaptureFixture[str]) -> None:
    """After `--refit-fusion` the node accepts the refitted manifest: the golden set expects
    the fused scores of the new weights (and says so), in a new file named for its content
    that the manifest names (the old file is gone); its items, references and model-score
    expectations are kept; a dry run leaves it alone."""
    manifest = engines_copy / "manifest.yaml"
    old_file = engines_copy / "golden" / "golden.npz"
    golden_before, fusion_before = old_file.read_bytes(), yaml.safe_load(
        manifest.read_text())["fusion"]
    argv = ["thresholds", "fit", "--data", str(small_dataset), "--target-fpr", "0.05",
            "--manifest", str(manifest), "--refit-fusion"]
    assert main([*argv, "--dry-run"]) == 0
    assert old_file.read_bytes() == golden_before
    capsys.readouterr()
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    data = yaml.safe_load(manifest.read_text())
    golden_file = _golden_named_by(manifest)
    assert data["golden"]["file"] == f"golden/golden-{data['golden']['sha256'][:12]}.npz"
    assert sorted(p.name for p in golden_file.parent.iterdir()) == [golden_file.name]
    assert data["fusion"]["weights"] != fusion_before["weights"]
    assert data["fusion"]["geometry"] == fusion_before["geometry"]

    inspector = ItemInspector.load(models_cfg, load_catalogue())
    report = golden_self_test(inspector)
    assert report.passed, report.failures
    golden = load_golden(golden_file, data["golden"]["sha256"])
    fused = np.array([r.fused for r in golden_scores(inspector, golden)])
    np.testing.assert_allclose(golden.expected["fused"], fused, rtol=0, atol=1e-9)

    before, after = _arrays(golden_before), _arrays(golden_file.read_bytes())
    assert np.abs(after["expected_fused"] - before["expected_fused"]).max() > 1e-3
    assert summary["golden"]["recomputed"] == ["fused"]
    assert (summary["golden"]["file"], summary["golden"]["sha256"]) == (
        data["golden"]["file"], data["golden"]["sha256"])
    for key in before.keys() - {"expected_fused"}:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    assert after.keys() == before.keys()


def test_refit_whose_manifest_cannot_be_written_leaves_the_golden_set(
        small_dataset: Path, engines_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the manifest write fails, the golden set is not replaced either (and no temporary
    file is left): manifest and golden set still match, so the node still starts."""
    manifest = engines_copy / "manifest.yaml"
    golden_dir = engines_copy / "golden"
    manifest_before, golden_before = manifest.read_bytes(), (golden_dir / "golden.npz").read_bytes()
    real_replace = os.replace

    def replace(src: str | Path, dst: str | Path) -> None:  # the disk fills up right there
        if Path(dst) == manifest.resolve():
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="No space left on device"):
        main(["thresholds", "fit", "--data", str(small_dataset), "--manifest", str(manifest),
              "--refit-fusion"])
    assert manifest.read_bytes() == manifest_before
    assert _golden_named_by(manifest).read_bytes() == golden_before
    assert sorted(p.name for p in golden_dir.iterdir()) == ["golden.npz"]


def test_refit_whose_golden_file_cannot_be_renamed_leaves_a_matching_manifest(
        small_dataset: Path, engines_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The refitted golden set cannot be renamed into place (the disk fails, or the tool dies
    there): the manifest is left as it was, naming a golden file with the sha256 it records,
    so the node still starts (it used to name the new sha256 already, for the old file);
    no temporary file is left."""
    manifest = engines_copy / "manifest.yaml"
    golden_dir = engines_copy / "golden"
    manifest_before = manifest.read_bytes()
    real_replace = Path.replace

    def replace(self: Path, target: str | Path) -> Path:
        if self.parent == golden_dir:
            raise OSError(errno.EIO, "Input/output error", str(self))
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", replace)
    with pytest.raises(OSError, match="Input/output error"):
        main(["thresholds", "fit", "--data", str(small_dataset), "--manifest", str(manifest),
              "--refit-fusion"])
    assert manifest.read_bytes() == manifest_before
    assert _golden_named_by(manifest).name == "golden.npz"
    assert sorted(p.name for p in golden_dir.iterdir()) == ["golden.npz"]


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
