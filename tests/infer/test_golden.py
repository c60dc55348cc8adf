"""Golden self-test: the shipped models reproduce their stored scores; tampering is caught."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from edge.catalogue import load_catalogue
from edge.config import ModelsConfig
from edge.infer.golden import golden_self_test
from edge.infer.inspector import ItemInspector
from edge.infer.reload import ModelRejectedError, reload_models


def _tamper_damage_model(engines: Path, delta: float) -> None:
    """Shift the damage head's output bias and re-sign the manifest (a swapped model)."""
    onnx = pytest.importorskip("onnx", reason="onnx (a training dependency) edits the model")
    from onnx import numpy_helper

    path = engines / "damage" / "damage.onnx"
    model = onnx.load(str(path))
    last = [i for i in model.graph.initializer if len(i.dims) == 1 and i.dims[0] == 6][-1]
    arr = numpy_helper.to_array(last).copy() + np.float32(delta)
    last.CopyFrom(numpy_helper.from_array(arr, last.name))
    onnx.save(model, str(path))
    manifest = engines / "manifest.yaml"
    data = yaml.safe_load(manifest.read_text())
    data["models"]["damage"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest.write_text(yaml.safe_dump(data, sort_keys=False))


def test_shipped_models_pass_the_golden_self_test(inspector: ItemInspector) -> None:
    """End to end through ONNX Runtime the golden items score as stored (tiny differences)."""
    report = golden_self_test(inspector)
    assert report.passed, report.failures
    assert report.items >= 8
    assert report.max_abs_diff <= report.tolerance
    assert report.to_dict()["backend"] == "onnxruntime"


def test_tampered_model_fails_the_self_test(models_cfg: ModelsConfig,
                                            engines_copy: Path) -> None:
    """A model with altered weights (hash updated to match) is caught by its scores."""
    _tamper_damage_model(engines_copy, 1.5)
    insp = ItemInspector.load(models_cfg, load_catalogue())
    report = golden_self_test(insp)
    assert not report.passed
    assert any("damage" in f for f in report.failures)


def test_reload_refuses_a_model_that_fails_and_keeps_the_old(models_cfg: ModelsConfig,
                                                             engines_copy: Path) -> None:
    """SIGHUP reload: a new model failing the golden set is refused; the old one keeps running."""
    insp = ItemInspector.load(models_cfg, load_catalogue())
    before = insp.damage
    assert reload_models(insp).passed  # unchanged models reload fine
    _tamper_damage_model(engines_copy, 1.5)
    with pytest.raises(ModelRejectedError) as err:
        reload_models(insp)
    assert not err.value.report.passed
    assert insp.damage is not before  # the first (good) reload's backend stays in use
    assert golden_self_test(insp).passed


def test_missing_golden_set_fails_instead_of_raising(models_cfg: ModelsConfig,
                                                     engines_copy: Path) -> None:
    """Without its golden file the self-test reports a failure (status), it does not crash."""
    insp = ItemInspector.load(models_cfg, load_catalogue())
    (engines_copy / "golden" / "golden.npz").unlink()
    report = golden_self_test(insp)
    assert not report.passed
    assert "golden set missing" in report.failures[0]
