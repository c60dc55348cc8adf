"""TensorRT engine cache: keys, sidecars, atomic rebuilds (a fake builder without TensorRT)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from edge.infer.backend import BackendError, Tensor
from edge.infer.engines import EngineCache
from edge.infer.manifest import ModelSpec, TensorSpec
from edge.infer.plans import EngineKey, Environment, read_l4t

try:
    import edge.infer.tensorrt  # noqa: F401  (raises ImportError without a real TensorRT)

    HAS_TENSORRT = True
except ImportError:
    HAS_TENSORRT = False


class FakeBuilder:
    """Writes the key into the 'plan'; counts builds; can be told to fail."""

    def __init__(self) -> None:
        self.env = Environment("10.3.0", "8.7", "R36 (release), REVISION: 4.3")
        self.builds = 0
        self.fail = False

    def environment(self) -> Environment:
        return self.env

    def build(self, onnx: Path, out: Path, key: EngineKey, *, progress: object,
              calibration: Sequence[Mapping[str, Tensor]] | None,
              calibration_cache: Path | None) -> None:
        self.builds += 1
        out.write_bytes(b"partial")
        if self.fail:
            raise BackendError("simulated build failure")
        out.write_bytes(json.dumps(key.to_dict()).encode())

    def loads(self, plan: Path) -> bool:
        return plan.read_bytes().startswith(b"{")


@pytest.fixture
def spec(tmp_path: Path) -> ModelSpec:
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"onnx")
    t = (TensorSpec("x", ("batch", 3), "float32"),)
    return ModelSpec("damage", "1", onnx, "a" * 64, t, t)


@pytest.fixture
def builder() -> FakeBuilder:
    return FakeBuilder()


@pytest.fixture
def cache(tmp_path: Path, builder: FakeBuilder) -> EngineCache:
    return EngineCache(tmp_path / "plans", builder, progress=lambda _msg: None)


def test_first_build_writes_plan_and_key_sidecar(cache: EngineCache, spec: ModelSpec,
                                                 builder: FakeBuilder) -> None:
    """A missing plan is built once; the sidecar holds every key field and the plan hash."""
    assert cache.status(spec).state == "missing"
    plan = cache.ensure(spec)
    meta = json.loads(plan.with_name(plan.name + ".json").read_text())
    assert set(meta["key"]) == {"onnx_sha256", "tensorrt", "l4t", "compute_capability",
                                "precision", "profile", "dla_core"}
    assert meta["key"]["onnx_sha256"] == spec.sha256
    assert cache.status(spec).state == "fresh"
    cache.ensure(spec)
    assert builder.builds == 1  # not rebuilt on every start
    assert not list(plan.parent.glob("*.tmp"))


@pytest.mark.parametrize(("change", "field"), [
    ("tensorrt", "tensorrt"), ("l4t", "l4t"), ("cc", "compute_capability")])
def test_environment_change_makes_plan_stale_and_rebuilds(
        cache: EngineCache, spec: ModelSpec, builder: FakeBuilder, change: str, field: str) -> None:
    """A TensorRT, JetPack/L4T or GPU change is detected by the key and triggers a rebuild."""
    plan = cache.ensure(spec)
    env = builder.env
    builder.env = Environment("10.7.0" if change == "tensorrt" else env.tensorrt,
                              "8.9" if change == "cc" else env.compute_capability,
                              "R36.5" if change == "l4t" else env.l4t)
    st = cache.status(spec)
    assert st.state == "stale"
    assert field in st.detail
    cache.ensure(spec)
    assert builder.builds == 2
    assert plan.with_name("damage.fp16.prev.plan").is_file()  # the last good plan is kept


def test_new_onnx_precision_profile_and_dla_are_part_of_the_key(
        tmp_path: Path, spec: ModelSpec, builder: FakeBuilder) -> None:
    """Different ONNX hash, precision, shape profile or DLA core give different keys."""
    base = EngineCache(tmp_path, builder).key_for(spec, "fp16")
    other_spec = ModelSpec(spec.name, "2", spec.path, "b" * 64, spec.inputs, spec.outputs)
    keys = {base.digest(),
            EngineCache(tmp_path, builder).key_for(other_spec, "fp16").digest(),
            EngineCache(tmp_path, builder).key_for(spec, "int8").digest(),
            EngineCache(tmp_path, builder, profile=(1, 4, 8)).key_for(spec, "fp16").digest(),
            EngineCache(tmp_path, builder, dla_core=0).key_for(spec, "fp16").digest()}
    assert len(keys) == 5
    assert EngineKey.from_dict(base.to_dict()) == base


def test_corrupt_plan_is_rebuilt_not_loaded(cache: EngineCache, spec: ModelSpec,
                                            builder: FakeBuilder) -> None:
    """A plan whose bytes no longer match the sidecar hash is reported corrupt and rebuilt."""
    plan = cache.ensure(spec)
    plan.write_bytes(b"garbage")
    assert cache.status(spec).state == "corrupt"
    assert cache.verify(spec).state == "corrupt"
    cache.ensure(spec)
    assert builder.builds == 2
    assert cache.verify(spec).state == "fresh"


def test_failed_build_keeps_last_good_plan_and_leaves_no_temp(
        cache: EngineCache, spec: ModelSpec, builder: FakeBuilder) -> None:
    """A build that fails raises once, leaves the installed plan untouched and no temp file."""
    plan = cache.ensure(spec)
    good = plan.read_bytes()
    builder.env = Environment("10.8.0", "8.7", None)
    builder.fail = True
    with pytest.raises(BackendError, match="simulated"):
        cache.ensure(spec)
    assert plan.read_bytes() == good
    assert not list(plan.parent.glob(".*tmp"))


def test_int8_plan_rejected_by_golden_check_is_not_installed(
        cache: EngineCache, spec: ModelSpec) -> None:
    """An INT8 plan that fails the accuracy check against FP16 is set aside, never used."""
    with pytest.raises(BackendError, match="rejected"):
        cache.ensure(spec, "int8", calibration=[{"x": None}], accept=lambda _p: False)  # type: ignore[dict-item]
    assert cache.status(spec, "int8").state == "missing"
    assert cache.plan_path("damage", "int8").with_name("damage.int8.rejected.plan").is_file()
    cache.ensure(spec, "int8", calibration=[], accept=lambda _p: True)
    assert cache.status(spec, "int8").state == "fresh"


def test_read_l4t_parses_the_release_line(tmp_path: Path) -> None:
    """/etc/nv_tegra_release's first line identifies the JetPack/L4T release; absent elsewhere."""
    f = tmp_path / "nv_tegra_release"
    f.write_text("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64\n")
    assert read_l4t(f) == "R36 (release), REVISION: 4.3"
    assert read_l4t(tmp_path / "absent") is None


def test_without_tensorrt_the_cache_explains_itself(tmp_path: Path, spec: ModelSpec) -> None:
    """With no TensorRT installed, asking for a plan says so instead of crashing obscurely."""
    if HAS_TENSORRT:
        pytest.skip("TensorRT is installed here")
    with pytest.raises(BackendError, match="TensorRT is not installed"):
        EngineCache(tmp_path).status(spec)


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TENSORRT, reason="TensorRT cannot be installed on this machine "
                    "(no CUDA GPU); real engine builds run on a Jetson / GPU CI runner")
def test_real_tensorrt_build_and_run_matches_onnxruntime(tmp_path: Path) -> None:
    """On a TensorRT host: build the shipped damage model and compare with ONNX Runtime."""
    from edge.config import DEFAULT_MANIFEST
    from edge.infer.manifest import load_manifest
    from edge.infer.onnxruntime import OnnxRuntimeBackend
    from edge.infer.tensorrt import TensorRTBackend

    spec = load_manifest(DEFAULT_MANIFEST).model("damage")
    plan = EngineCache(tmp_path).ensure(spec)
    rng = np.random.default_rng(0)
    size = int(spec.preprocessing["size"])
    feed = {"trunk": rng.random((3, 80, size // 16, size // 16), np.float32),
            "depth": rng.random((3, 3, size, size), np.float32)}
    trt_out = TensorRTBackend(spec, plan, max_batch=2).run(feed)
    ort_out = OnnxRuntimeBackend(spec).run(feed)
    assert float(np.abs(trt_out["probs"] - ort_out["probs"]).max()) < 0.02


def test_int8_calibration_set_and_acceptance_against_fp16(tmp_path: Path) -> None:
    """Calibration inputs come from the shipped golden set; INT8 within tolerance is accepted."""
    from edge.config import DEFAULT_MANIFEST
    from edge.infer.int8 import int8_acceptance, int8_sets
    from edge.infer.manifest import load_manifest
    from edge.infer.onnxruntime import OnnxRuntimeBackend

    manifest = load_manifest(DEFAULT_MANIFEST)
    sets = int8_sets(manifest, batch=8)
    size = int(manifest.model("embedding").preprocessing["size"])
    assert sets.calibration["damage"][0]["trunk"].shape[1:] == (80, size // 16, size // 16)
    assert sets.calibration["embedding"][0]["rgb"].shape[1:] == (3, size, size)
    spec = manifest.model("damage")
    # Stand-ins for plans: ONNX Runtime on the same model agrees with itself.
    accept = int8_acceptance(spec, spec.path, sets.check["damage"][:1],
                             lambda s, _p: OnnxRuntimeBackend(s))
    assert accept(spec.path)
    reject = int8_acceptance(spec, spec.path, sets.check["damage"][:1],
                             lambda s, _p: OnnxRuntimeBackend(s), tolerance=-1.0)
    assert not reject(spec.path)


def _rows(batches: Sequence[Mapping[str, Tensor]], name: str) -> list[bytes]:
    return [row.tobytes() for b in batches for row in b[name]]


def test_int8_calibration_and_check_sets_are_disjoint_and_deterministic() -> None:
    """The INT8 acceptance check never sees an input calibration used: the golden items and
    reference views are split disjointly, the same way every time, nothing left out."""
    from edge.config import DEFAULT_MANIFEST
    from edge.infer.golden import load_golden
    from edge.infer.int8 import int8_sets
    from edge.infer.manifest import load_manifest

    manifest = load_manifest(DEFAULT_MANIFEST)
    sets, again = int8_sets(manifest, batch=8), int8_sets(manifest, batch=8)
    golden = load_golden(manifest.path.parent / str(manifest.golden["file"]))
    crops = sum(len(r.crops) for r in golden.records)
    for model, name, total in (("embedding", "rgb", crops + len(golden.references)),
                               ("damage", "depth", crops), ("damage", "trunk", crops)):
        calib, check = _rows(sets.calibration[model], name), _rows(sets.check[model], name)
        assert calib
        assert check
        assert not set(calib) & set(check)
        assert len(calib) + len(check) == total
        assert calib == _rows(again.calibration[model], name)
        assert check == _rows(again.check[model], name)
    assert all(len(b["rgb"]) <= 8 for b in sets.calibration["embedding"])


def test_int8_build_calibrates_on_one_set_and_accepts_on_the_other(
        monkeypatch: pytest.MonkeyPatch, spec: ModelSpec) -> None:
    """`engines build --precision int8` passes the calibration split to the build and the
    held-out split to the golden check against FP16."""
    from edge.commands import models as commands
    from edge.config import ModelsConfig
    from edge.infer.int8 import Int8Sets

    calib = [{"x": np.zeros((2, 3), np.float32)}]
    check = [{"x": np.ones((2, 3), np.float32)}]
    sets = Int8Sets(calibration={"damage": calib}, check={"damage": check})
    judged: list[object] = []

    def acceptance(_spec: object, _fp16: object, batches: object, _open: object) -> object:
        judged.append(batches)
        return lambda _p: True

    monkeypatch.setattr(commands, "int8_acceptance", acceptance)
    calls: list[tuple[str, object]] = []

    class Cache:
        def ensure(self, _spec: object, precision: str, *, calibration: object = None,
                   accept: object = None) -> Path:
            calls.append((precision, calibration))
            return Path("fp16.plan")

    commands._build(Cache(), spec, "int8", sets, ModelsConfig())
    assert calls == [("fp16", None), ("int8", calib)]
    assert judged == [check]
