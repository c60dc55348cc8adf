"""What a TensorRT node installs: the `tensorrt` extra and the release bundle's wheels."""

from __future__ import annotations

import importlib.util
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

from edge.infer.plans import CUDA_PYTHON_REQUIREMENT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (JetPack 6)
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def make_bundle() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_bundle", REPO / "tools" / "make_bundle.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tensorrt_extra_matches_jetpack_6() -> None:
    """The `tensorrt` extra takes JetPack 6.0's TensorRT 8.6 and pins cuda-python to CUDA 12."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    extra = pyproject["project"]["optional-dependencies"]["tensorrt"]
    assert CUDA_PYTHON_REQUIREMENT == "cuda-python>=12,<13"
    assert sorted(extra) == sorted(["tensorrt>=8.6", CUDA_PYTHON_REQUIREMENT])


def _stage(root: Path, wheels: list[str]) -> Path:
    stage = root / "stage"
    (stage / "engines").mkdir(parents=True)
    (stage / "engines" / "manifest.yaml").write_text("models: {}\n")
    (stage / "wheels").mkdir()
    for name in ["conveyor_vision-1.0.0-py3-none-any.whl", *wheels]:
        (stage / "wheels" / name).write_bytes(b"wheel")
    return stage


def _build(make_bundle: ModuleType, tmp_path: Path, stage: Path, *extra: str) -> int:
    key = tmp_path / "signing.pem"
    if not key.exists():
        assert make_bundle.main(["keygen", "--private", str(key),
                                 "--public", str(tmp_path / "signing.pub")]) == 0
    return int(make_bundle.main(["build", "--version", "1.0.0", "--key", str(key), "--out",
                                 str(tmp_path / "out.cvb"), *extra, str(stage)]))


def test_tensorrt_bundle_must_carry_cuda_python_for_cuda_12(
        make_bundle: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A full bundle built for backend tensorrt is refused without a cuda-python 12 wheel
    (none, or one for CUDA 13) and carries it when staged; onnxruntime bundles need none."""
    bare = _stage(tmp_path / "a", [])
    assert _build(make_bundle, tmp_path, bare, "--backend", "tensorrt") == 1
    assert "cuda-python>=12,<13" in capsys.readouterr().err
    assert _build(make_bundle, tmp_path, bare) == 0  # onnxruntime, the default
    cuda13 = _stage(tmp_path / "b", ["cuda_python-13.0.1-py3-none-any.whl"])
    assert _build(make_bundle, tmp_path, cuda13, "--backend", "tensorrt") == 1
    assert "found 13.0.1" in capsys.readouterr().err
    wheel = "cuda_python-12.6.2-py3-none-any.whl"
    good = _stage(tmp_path / "c", [wheel, "cuda_bindings-12.6.2-cp310-cp310-linux_aarch64.whl"])
    assert _build(make_bundle, tmp_path, good, "--backend", "tensorrt") == 0
    with tarfile.open(tmp_path / "out.cvb") as tar:
        assert f"payload/wheels/{wheel}" in tar.getnames()


def test_requirements_command_prints_what_to_stage(
        make_bundle: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    """`make_bundle.py requirements --backend tensorrt` prints the cuda-python pin for `pip
    wheel`; onnxruntime needs nothing extra."""
    assert make_bundle.main(["requirements", "--backend", "tensorrt"]) == 0
    assert capsys.readouterr().out.splitlines() == [CUDA_PYTHON_REQUIREMENT]
    assert make_bundle.main(["requirements", "--backend", "onnxruntime"]) == 0
    assert capsys.readouterr().out == ""
