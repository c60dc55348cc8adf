"""The TensorRT builder, backend and calibrator against fake TensorRT 8.6 and 10 modules.

Real TensorRT cannot be installed here (no CUDA GPU); `tests/infer/fake_tensorrt.py`
models the API differences that matter (explicit-batch networks) and checks every
device copy against its allocation.
"""

from __future__ import annotations

import importlib
import itertools
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

import edge.infer
from edge.commands.main import main
from edge.config import ConfigError, parse_config_text
from edge.infer.backend import BackendError
from edge.infer.engines import EngineCache
from edge.infer.manifest import ModelSpec, TensorSpec
from edge.infer.plans import CUDA_PYTHON_REQUIREMENT, SUPPORTED_PLATFORMS, EngineKey
from tests.infer.fake_tensorrt import FakeCudart, make_fake_tensorrt

REPO = Path(__file__).resolve().parents[2]
Loaded = tuple[ModuleType, ModuleType, FakeCudart]

try:
    import edge.infer.tensorrt  # raises ImportError without a real TensorRT

    HAS_TENSORRT = True
except ImportError:
    HAS_TENSORRT = False


@pytest.fixture
def load_trt(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Loaded]]:
    """load_trt(version, **fake_options) -> (edge.infer.tensorrt, fake tensorrt, fake cudart),
    imported afresh against the fake; the real state is put back afterwards."""
    saved = sys.modules.pop("edge.infer.tensorrt", None)
    saved_attr = edge.infer.__dict__.get("tensorrt")

    def load(version: str, *, fake_cudart: bool = True, **options: Any) -> Loaded:
        cudart = FakeCudart()
        fake = make_fake_tensorrt(version, cudart, **options)
        monkeypatch.setitem(sys.modules, "tensorrt", fake)
        sys.modules.pop("edge.infer.tensorrt", None)
        module = importlib.import_module("edge.infer.tensorrt")
        if fake_cudart:
            monkeypatch.setattr(module, "_cudart", lambda: cudart)
        return module, fake, cudart

    yield load
    sys.modules.pop("edge.infer.tensorrt", None)
    if saved is not None:
        sys.modules["edge.infer.tensorrt"] = saved
    if saved_attr is None:
        edge.infer.__dict__.pop("tensorrt", None)
    else:
        edge.infer.tensorrt = saved_attr  # type: ignore[attr-defined]


@pytest.fixture
def spec(tmp_path: Path) -> ModelSpec:
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"onnx")
    return ModelSpec("damage", "1", onnx, "a" * 64, (TensorSpec("x", ("batch", 3), "float32"),),
                     (TensorSpec("y", ("batch", 2), "float32"),))


API_VERSIONS = [("8.6.1.6", None), ("10.3.0.30", None), ("10.13.0.35", False)]


@pytest.mark.parametrize(("version", "flag"), API_VERSIONS)
def test_builder_makes_an_explicit_batch_network_on_trt86_and_trt10(
        load_trt: Callable[..., Loaded], spec: ModelSpec, tmp_path: Path, version: str,
        flag: bool | None) -> None:
    """The builder asks for an explicit-batch network (the flag on 8.6, 0 on 10) and the
    parse, config, profile, build and load calls all succeed on both APIs."""
    trt_module, fake, _ = load_trt(version, explicit_batch_flag=flag)
    cache = EngineCache(tmp_path / "plans", progress=lambda _m: None)
    plan = cache.ensure(spec)
    builder = fake.builders[-1]
    assert builder.network.explicit_batch
    assert builder.network.flags == (1 if version.startswith("8.") else 0)
    assert trt_module.network_flags() == builder.network.flags
    config = builder.config
    assert fake.BuilderFlag.FP16 in config.flags
    assert config.pools[fake.MemoryPoolType.WORKSPACE] == 1 << 30
    assert config.profiles[0].shapes["x"] == ((1, 3), (8, 3), (16, 3))
    assert config.default_device_type == fake.DeviceType.GPU
    assert cache.status(spec).state == "fresh"
    assert cache.verify(spec).state == "fresh"  # the plan deserializes
    assert json.loads(plan.with_name(plan.name + ".json").read_text())["key"]["tensorrt"] \
        == version


@pytest.mark.parametrize(("version", "flag"), API_VERSIONS)
def test_backend_runs_a_plan_on_trt86_and_trt10(load_trt: Callable[..., Loaded],
                                                spec: ModelSpec, tmp_path: Path, version: str,
                                                flag: bool | None) -> None:
    """The backend's named-tensor calls (num_io_tensors, set_input_shape, execute_async_v3)
    run a plan on both APIs, in chunks of max_batch, on the DLA core it is given."""
    trt_module, fake, cudart = load_trt(version, explicit_batch_flag=flag)
    plan = EngineCache(tmp_path, dla_core=1, progress=lambda _m: None).ensure(spec)
    backend = trt_module.TensorRTBackend(spec, plan, max_batch=4, dla_core=1)
    assert fake.runtimes[-1].DLA_core == 1
    x = np.arange(30, dtype=np.float32).reshape(10, 3)
    out = backend.run({"x": x})
    np.testing.assert_array_equal(out["y"], 2 * x[:, :2])
    backend.close()
    assert not cudart.device
    assert not cudart.host


def test_tensorrt_older_than_8_6_is_refused_in_one_line(
        load_trt: Callable[..., Loaded], spec: ModelSpec, tmp_path: Path) -> None:
    """TensorRT 8.5 (JetPack 5.1) is refused by builder and backend with one line naming it."""
    trt_module, _, _ = load_trt("8.5.2.2")
    with pytest.raises(BackendError) as err:
        EngineCache(tmp_path).status(spec)
    message = str(err.value)
    assert "TensorRT 8.5.2.2" in message
    assert ">= 8.6" in message
    assert "\n" not in message
    with pytest.raises(BackendError, match=r"TensorRT 8\.5\.2\.2"):
        trt_module.TensorRTBackend(spec, tmp_path / "any.plan")


def test_missing_cuda_python_is_a_one_line_refusal(load_trt: Callable[..., Loaded],
                                                  spec: ModelSpec, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """With TensorRT but no cuda-python, asking for a plan names the package, no traceback."""
    load_trt("10.3.0.30", fake_cudart=False)
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(BackendError) as err:
        EngineCache(tmp_path).status(spec)
    assert "cuda-python" in str(err.value)
    assert CUDA_PYTHON_REQUIREMENT in str(err.value)
    assert "\n" not in str(err.value)


def test_dla_core_reaches_the_builder_and_must_exist(load_trt: Callable[..., Loaded],
                                                    spec: ModelSpec, tmp_path: Path) -> None:
    """A configured DLA core is set on the builder config (with GPU fallback) and is part of
    the plan key; a core the device does not have is refused, naming the count."""
    _, fake, _ = load_trt("10.3.0.30", dla_cores=2)
    plan = EngineCache(tmp_path / "a", dla_core=1, progress=lambda _m: None).ensure(spec)
    config = fake.builders[-1].config
    assert config.default_device_type == fake.DeviceType.DLA
    assert config.DLA_core == 1
    assert fake.BuilderFlag.GPU_FALLBACK in config.flags
    assert json.loads(plan.with_name(plan.name + ".json").read_text())["key"]["dla_core"] == 1
    _, fake, _ = load_trt("10.3.0.30", dla_cores=0)  # e.g. an Orin Nano
    with pytest.raises(BackendError, match="0 DLA core"):
        EngineCache(tmp_path / "b", dla_core=0, progress=lambda _m: None).ensure(spec)


def _int8_build(trt_module: ModuleType, tmp_path: Path, batches: list[dict[str, np.ndarray]],
                spec: ModelSpec) -> None:
    key = EngineKey(spec.sha256, "x", None, "8.7", "int8", (1, 8, 16), None)
    trt_module.TensorRTBuilder().build(spec.path, tmp_path / "p.plan", key,
                                       progress=lambda _m: None, calibration=batches,
                                       calibration_cache=tmp_path / "calib.cache")


@pytest.mark.parametrize("version", ["8.6.1.6", "10.3.0.30"])
@pytest.mark.parametrize("sizes", [[8, 8, 3], [3, 8]])
def test_calibrator_feeds_full_batches_without_stale_data(
        load_trt: Callable[..., Loaded], spec: ModelSpec, tmp_path: Path,
        sizes: list[int], version: str) -> None:
    """Calibration buffers are sized from the largest batch, every batch TensorRT reads is
    that size (the calibration profile's), and a short last batch is padded with items from
    the start of the set, never with the previous batch's stale items."""
    trt_module, fake, cudart = load_trt(version)
    total = sum(sizes)
    items = np.arange(total * 3, dtype=np.float32).reshape(total, 3)
    starts = np.cumsum([0, *sizes])
    batches = [{"x": items[a:b]} for a, b in itertools.pairwise(starts)]
    _int8_build(trt_module, tmp_path, batches, spec)
    builder = fake.builders[-1]
    order = list(range(total)) + list(range(-total % 8))  # wrap-around padding
    expected = [items[order[i:i + 8]] for i in range(0, len(order), 8)]
    reads = builder.calibration_reads["x"]
    assert len(reads) == len(expected)
    for got, want in zip(reads, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    assert builder.config.calibration_profile.shapes["x"] == ((8, 3),) * 3
    assert (tmp_path / "calib.cache").read_bytes() == b"calibration table"
    assert not cudart.device  # calibration buffers freed after the build


def test_engines_build_with_onnxruntime_has_nothing_to_build(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`edge-node engines build` with models.backend onnxruntime exits 0 with one line saying
    there is nothing to build (the engines unit succeeds, so the node unit starts)."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"models:\n  backend: onnxruntime\n  engine_cache: {tmp_path / 'plans'}\n")
    assert main(["engines", "build", "--config", str(cfg)]) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert len(lines) == 1
    assert "nothing to build" in lines[0]
    assert "ONNX Runtime" in lines[0]
    assert not (tmp_path / "plans").exists()


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_engines_build_with_tensorrt_missing_exits_2_naming_it(tmp_path: Path) -> None:
    """`python -m edge engines build` with backend tensorrt where TensorRT is not installed
    exits 2 with one line naming the `tensorrt` package, no traceback."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"models:\n  backend: tensorrt\n  engine_cache: {tmp_path / 'plans'}\n")
    done = subprocess.run([sys.executable, "-m", "edge", "engines", "build", "--config",
                           str(cfg)], capture_output=True, text=True, cwd=REPO, timeout=120,
                          check=False)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "`tensorrt`" in lines[0]
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


def test_dla_core_is_config_checked() -> None:
    """models.dla_core is accepted with backend tensorrt and refused, naming the key, with
    onnxruntime (which has no DLA) or beyond the two cores a Jetson has."""
    cfg = parse_config_text("models:\n  backend: tensorrt\n  dla_core: 1\n")
    assert cfg.models.dla_core == 1
    assert parse_config_text("models: {}\n").models.dla_core is None
    with pytest.raises(ConfigError, match=r"models\.dla_core"):
        parse_config_text("models:\n  backend: onnxruntime\n  dla_core: 0\n")
    with pytest.raises(ConfigError, match=r"models\.dla_core"):
        parse_config_text("models:\n  backend: tensorrt\n  dla_core: 2\n")


def test_support_range_is_stated_in_the_docs() -> None:
    """The supported platforms (JetPack 6.x, TensorRT 8.6/10.3; not JetPack 5.1) are one
    constant, and the model docs say the same."""
    assert "TensorRT 8.6" in SUPPORTED_PLATFORMS
    assert "JetPack 5.1" in SUPPORTED_PLATFORMS
    docs = " ".join((REPO / "docs" / "models.md").read_text().split())
    for phrase in ("JetPack 6.0", "TensorRT 8.6", "10.3", "JetPack 5.1", "Python 3.8",
                   CUDA_PYTHON_REQUIREMENT):
        assert phrase in docs
