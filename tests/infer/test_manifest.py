"""Manifest loading: missing, corrupt or mismatched model files stop the node with a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from edge.catalogue import load_catalogue
from edge.config import ModelsConfig
from edge.infer.backend import BackendError
from edge.infer.inspector import ItemInspector
from edge.infer.manifest import ManifestError, TensorSpec, load_manifest
from edge.infer.onnxruntime import OnnxRuntimeBackend, choose_providers


def _edit(manifest: Path, change: object) -> None:
    data = yaml.safe_load(manifest.read_text())
    change(data)  # type: ignore[operator]
    manifest.write_text(yaml.safe_dump(data, sort_keys=False))


def test_shipped_manifest_verifies(engines_copy: Path) -> None:
    """The shipped manifest names both models with versions, hashes, tensors and thresholds."""
    m = load_manifest(engines_copy / "manifest.yaml")
    assert set(m.models) == {"embedding", "damage"}
    cells = int(m.model("embedding").preprocessing["size"]) // 16
    assert m.model("damage").inputs[0] == TensorSpec("trunk", ("batch", 80, cells, cells),
                                                     "float32")
    assert [t.name for t in m.model("embedding").outputs][:2] == ["patches", "trunk"]
    assert m.threshold_version != "unversioned"
    assert 0.0 < m.thresholds["target_fpr"] < 0.05
    assert "mean" in m.fusion["anomaly_norm"]


def test_missing_model_file_names_file_and_expected_hash(models_cfg: ModelsConfig,
                                                         engines_copy: Path) -> None:
    """Deleting a model file: the node refuses to start, naming the file and its sha256."""
    (engines_copy / "damage" / "damage.onnx").unlink()
    with pytest.raises(ManifestError) as err:
        ItemInspector.load(models_cfg, load_catalogue())
    msg = str(err.value)
    assert "damage.onnx" in msg
    assert "missing" in msg
    assert load_manifest(models_cfg.manifest, verify=False).model("damage").sha256 in msg


def test_corrupt_model_file_is_refused(models_cfg: ModelsConfig, engines_copy: Path) -> None:
    """A model file with other bytes (truncated, replaced) fails the sha256 check."""
    path = engines_copy / "embedding" / "embedding.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ManifestError, match=r"embedding\.onnx: sha256 is .* expected sha256"):
        ItemInspector.load(models_cfg, load_catalogue())


def test_shape_mismatch_between_manifest_and_model(engines_copy: Path) -> None:
    """A manifest expecting other tensor shapes than the ONNX file has is an error."""
    def change(d: dict) -> None:  # type: ignore[type-arg]
        d["models"]["damage"]["outputs"][0]["shape"] = ["batch", 7]
    _edit(engines_copy / "manifest.yaml", change)
    spec = load_manifest(engines_copy / "manifest.yaml").model("damage")
    with pytest.raises(ManifestError, match=r"output 'probs' is \['batch', 6\].*\['batch', 7\]"):
        OnnxRuntimeBackend(spec)


def test_input_name_mismatch(engines_copy: Path) -> None:
    """A renamed input is reported with the names the model really has."""
    def change(d: dict) -> None:  # type: ignore[type-arg]
        d["models"]["embedding"]["inputs"][0]["name"] = "image"
    _edit(engines_copy / "manifest.yaml", change)
    spec = load_manifest(engines_copy / "manifest.yaml").model("embedding")
    with pytest.raises(ManifestError, match=r"no input named 'image' \(it has \['rgb'\]\)"):
        OnnxRuntimeBackend(spec)


def test_missing_manifest_and_bad_schema(tmp_path: Path, engines_copy: Path) -> None:
    """No manifest, or one of another schema, gives a ManifestError naming the file."""
    with pytest.raises(ManifestError, match="manifest is missing"):
        load_manifest(tmp_path / "nope.yaml")
    _edit(engines_copy / "manifest.yaml", lambda d: d.update(schema=99))
    with pytest.raises(ManifestError, match="schema is 99"):
        load_manifest(engines_copy / "manifest.yaml")
    _edit(engines_copy / "manifest.yaml", lambda d: d.update(schema=1) or d["models"]["damage"]
          .pop("sha256"))
    with pytest.raises(ManifestError, match="'sha256' is missing"):
        load_manifest(engines_copy / "manifest.yaml")


def test_not_an_onnx_file_with_matching_hash(engines_copy: Path) -> None:
    """Bytes that hash right but are not ONNX: ONNX Runtime's refusal is a BackendError."""
    path = engines_copy / "damage" / "damage.onnx"
    path.write_bytes(b"not onnx")
    import hashlib

    def change(d: dict) -> None:  # type: ignore[type-arg]
        d["models"]["damage"]["sha256"] = hashlib.sha256(b"not onnx").hexdigest()
    _edit(engines_copy / "manifest.yaml", change)
    spec = load_manifest(engines_copy / "manifest.yaml").model("damage")
    with pytest.raises(BackendError, match=r"damage\.onnx: ONNX Runtime cannot load it"):
        OnnxRuntimeBackend(spec)


def test_provider_choice_falls_back_to_cpu() -> None:
    """Requested providers that are not installed are dropped; CPU is always last."""
    assert choose_providers(["CPUExecutionProvider"], None) == ["CPUExecutionProvider"]
    assert choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"],
                            ["TensorrtExecutionProvider", "CUDAExecutionProvider"]) == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
