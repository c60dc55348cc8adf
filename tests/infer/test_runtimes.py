"""Which runtime opens a model: a missing one is a one-line refusal, never a traceback."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from edge.config import DEFAULT_MANIFEST, ModelsConfig
from edge.infer.backend import BackendError
from edge.infer.manifest import load_manifest
from edge.infer.runtimes import open_backend


def _real_tensorrt() -> bool:
    """TensorRT itself, not the type stubs' namespace package that mypy reads."""
    try:
        module = importlib.import_module("tensorrt")
    except ImportError:
        return False
    return hasattr(module, "__version__")


@pytest.mark.skipif(_real_tensorrt(), reason="TensorRT is installed here: nothing to refuse")
def test_backend_tensorrt_without_tensorrt_is_one_line_naming_the_package(
        tmp_path: Path) -> None:
    """A node configured for TensorRT on a machine without it says so in one line that names
    the missing package, before any engine is looked for."""
    spec = next(iter(load_manifest(DEFAULT_MANIFEST).models.values()))
    cfg = ModelsConfig(manifest=DEFAULT_MANIFEST, backend="tensorrt",
                       engine_cache=tmp_path / "plans")
    with pytest.raises(BackendError) as err:
        open_backend(spec, cfg)
    message = str(err.value)
    assert "\n" not in message
    assert "`tensorrt`" in message
    assert not (tmp_path / "plans").exists()


def test_an_unknown_backend_is_refused_naming_the_known_ones() -> None:
    """A backend name no runtime answers to is refused with the names that would work."""
    spec = next(iter(load_manifest(DEFAULT_MANIFEST).models.values()))
    cfg = ModelsConfig(manifest=DEFAULT_MANIFEST, backend="onnxruntime")
    object.__setattr__(cfg, "backend", "openvino")
    with pytest.raises(BackendError, match=r"onnxruntime.*tensorrt"):
        open_backend(spec, cfg)
