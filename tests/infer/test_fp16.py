"""FP16 safety of the shipped ONNX models (the TensorRT backend builds FP16 plans by default).

Both models are converted with `onnxconverter_common.float16` (keep_io_types) and run on
ONNX Runtime CPU. ONNX Runtime's CPU provider runs an FP16 op it has no FP16 kernel for in
FP32 and drops the casts between such ops, so a plain exp -> sum -> log chain does *not*
overflow there; TensorRT in FP16 may keep the exp in FP16 and overflow. So the damage model
is also run with the ONNX reference evaluator (numpy, every op in true FP16 arithmetic), and
the old formulation - `ReduceLogSumExp` lowered to exp -> sum -> log, built here with
`onnx.helper` - is shown to overflow on the same logits, so the checks are not vacuous.
Not checked on TensorRT itself (no GPU in CI).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from edge.catalogue import load_catalogue
from edge.config import DEFAULT_MANIFEST, ModelsConfig
from edge.infer.backend import Tensor
from edge.infer.gallery import ReferenceGallery
from edge.infer.golden import COMPARED, GoldenSet, golden_scores
from edge.infer.inspector import (
    ItemInspector,
    channel_order_is_rgb,
    depth_channels,
    rgb_channels,
)
from edge.infer.manifest import Manifest, ModelSpec, load_manifest

onnx = pytest.importorskip("onnx", reason="onnx (a training dependency) edits the models")
float16 = pytest.importorskip("onnxconverter_common.float16",
                              reason="onnxconverter-common (dev extra) converts to FP16")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

#: exp(x) exceeds the largest FP16 value (65504) above this.
FP16_EXP_LIMIT = math.log(65504.0)
#: Scales of the golden items' trunk features: 1 is what the trained model sees; beyond it
#: the damage map logits grow roughly linearly (to ~54 at 4x: ~270 times the sharpness).
SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)


def _session(model: Any) -> Any:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), sess_options=opts,
                                providers=["CPUExecutionProvider"])


class InMemoryBackend:
    """A `Backend` over an ONNX model held in memory (the FP16 conversions never hit disk)."""

    def __init__(self, spec: ModelSpec, model: Any) -> None:
        self._spec = spec
        self._session = _session(model)

    @property
    def name(self) -> str:
        return "onnxruntime-fp16"

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    def run(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        feed = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in inputs.items()}
        names = [t.name for t in self._spec.outputs]
        return dict(zip(names, self._session.run(names, feed), strict=True))

    def close(self) -> None:
        del self._session


def _to_fp16(model: Any) -> Any:
    with warnings.catch_warnings():  # tiny weights truncated to 1e-7: expected, harmless
        warnings.simplefilter("ignore", UserWarning)
        return float16.convert_float_to_float16(model, keep_io_types=True)


def _with_logits(model: Any) -> Any:
    """A copy of the damage model that also outputs the logits under its two sigmoids."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    producers = {n.output[0]: n for n in out.graph.node}
    for output, name in (("probs", "pooled_logits"), ("maps", "map_logits")):
        sigmoid = producers[output]
        assert sigmoid.op_type == "Sigmoid"
        out.graph.node.append(helper.make_node("Identity", [sigmoid.input[0]], [name]))
        out.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return out


def _sharpness(model: Any) -> float:
    """The log-sum-exp sharpness: the constant the map logits are multiplied by."""
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t)
              for n in model.graph.node if n.op_type == "Constant"}
    consts.update({i.name: numpy_helper.to_array(i) for i in model.graph.initializer})
    (mul,) = [n for n in model.graph.node if n.op_type == "Mul"]
    return float(next(consts[i] for i in mul.input if i in consts))


def _naive_pooling(n_cells: int, sharpness: float) -> Any:
    """The old head's pooling in FP16 as TensorRT may lower `ReduceLogSumExp`:
    (log(sum(exp(r * logits))) - log(n)) / r, logits [N, 6, cells]."""
    f16 = TensorProto.FLOAT16

    def const(name: str, value: float) -> Any:
        return helper.make_tensor(name, f16, [], [value])

    nodes = [helper.make_node("Mul", ["logits", "r"], ["z"]),
             helper.make_node("Exp", ["z"], ["e"]),
             helper.make_node("ReduceSum", ["e", "axes"], ["s"], keepdims=0),
             helper.make_node("Log", ["s"], ["lse"]),
             helper.make_node("Sub", ["lse", "log_n"], ["centred"]),
             helper.make_node("Div", ["centred", "r"], ["pooled"])]
    graph = helper.make_graph(
        nodes, "naive_log_sum_exp",
        [helper.make_tensor_value_info("logits", f16, ["N", 6, n_cells])],
        [helper.make_tensor_value_info("pooled", f16, ["N", 6])],
        initializer=[const("r", sharpness), const("log_n", math.log(n_cells)),
                     helper.make_tensor("axes", TensorProto.INT64, [1], [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return load_manifest(DEFAULT_MANIFEST)


@pytest.fixture(scope="module")
def models(manifest: Manifest) -> dict[str, tuple[Any, Any]]:
    """name -> (FP32 model, FP16 model); the damage model also outputs its logits."""
    emb = onnx.load(str(manifest.model("embedding").path))
    dmg = _with_logits(onnx.load(str(manifest.model("damage").path)))
    return {"embedding": (emb, _to_fp16(emb)), "damage": (dmg, _to_fp16(dmg))}


@pytest.fixture(scope="module")
def golden_feed(manifest: Manifest, golden: GoldenSet,
                models: dict[str, tuple[Any, Any]]) -> dict[str, np.ndarray]:
    """The damage model's FP32 inputs for every golden crop (trunk from the FP32 embedding)."""
    size = int(manifest.model("embedding").preprocessing["size"])
    scale = float(manifest.model("damage").preprocessing["height_scale_mm"])
    crops = [c for r in golden.records for c in r.crops.values()]
    rgb = np.zeros((len(crops), 3, size, size), np.float32)
    depth = np.zeros_like(rgb)
    for i, crop in enumerate(crops):
        rgb_channels(crop.color, size, rgb[i], to_rgb=channel_order_is_rgb(manifest))
        depth_channels(crop, size, scale, depth[i])
    (trunk,) = _session(models["embedding"][0]).run(["trunk"], {"rgb": rgb})
    return {"trunk": trunk, "depth": depth}


@pytest.fixture(scope="module")
def extreme_feed(golden_feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Golden trunk features scaled along their own direction (depth unchanged): from a
    quarter of the trained range to four times it."""
    return {"trunk": np.concatenate([golden_feed["trunk"] * s for s in SCALES]),
            "depth": np.concatenate([golden_feed["depth"]] * len(SCALES))}


def _run(model: Any, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = ["probs", "maps", "pooled_logits", "map_logits"]
    return dict(zip(names, _session(model).run(names, dict(feed)), strict=True))


def _evaluate(model: Any, names: list[str],
              feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run `model` on the ONNX reference evaluator: numpy, each op in its tensors' dtype."""
    with np.errstate(all="ignore"):  # overflows are what the callers look for
        out = ReferenceEvaluator(model).run(names, dict(feed))
    return {k: np.asarray(v) for k, v in zip(names, list(out), strict=True)}


@pytest.fixture(scope="module")
def extreme_fp32(models: dict[str, tuple[Any, Any]],
                 extreme_feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The FP32 damage model's outputs and logits on the extreme inputs."""
    return _run(models["damage"][0], extreme_feed)


def _overflows(fp32: Mapping[str, np.ndarray], sharpness: float) -> np.ndarray:
    """[N, 6]: where a plain FP16 exp of sharpness x map logit overflows (the largest alone)."""
    logits = fp32["map_logits"].reshape(*fp32["map_logits"].shape[:2], -1)
    return np.asarray(sharpness * logits.max(axis=2) > FP16_EXP_LIMIT + 0.01)


def test_damage_graph_exponentiates_only_max_subtracted_values(
        models: dict[str, tuple[Any, Any]]) -> None:
    """The exported head has no ReduceLogSumExp; its one Exp takes x - ReduceMax(x)."""
    graph = models["damage"][0].graph
    producers = {o: n for n in graph.node for o in n.output}
    assert not [n for n in graph.node if n.op_type == "ReduceLogSumExp"]
    (exp,) = [n for n in graph.node if n.op_type == "Exp"]
    sub = producers[exp.input[0]]
    assert sub.op_type == "Sub"
    assert producers[sub.input[1]].op_type == "ReduceMax"
    assert producers[sub.input[1]].input[0] == sub.input[0]


def test_naive_log_sum_exp_overflows_in_fp16_on_these_logits(
        models: dict[str, tuple[Any, Any]], extreme_fp32: dict[str, np.ndarray],
        capsys: pytest.CaptureFixture[str]) -> None:
    """The old formulation (plain exp -> sum -> log in FP16) gives inf on the test's inputs."""
    fp32 = extreme_fp32
    r = _sharpness(models["damage"][0])
    logits = fp32["map_logits"].reshape(*fp32["map_logits"].shape[:2], -1)
    assert r * logits.max() > 4 * FP16_EXP_LIMIT  # far past the FP16 exp limit
    pooled = _evaluate(_naive_pooling(logits.shape[2], r), ["pooled"],
                       {"logits": logits.astype(np.float16)})["pooled"]
    overflow = _overflows(fp32, r)
    # Where it overflows, the FP32 probability is often far from 1: inf (probability 1) is a
    # wrong answer there, not a saturated one. (Very negative logits underflow: -inf.)
    moderate = overflow & (fp32["probs"] < 0.99)
    with capsys.disabled():
        print(f"\nnaive FP16 log-sum-exp: {int(np.isposinf(pooled).sum())} of {pooled.size} "
              f"pooled logits +inf ({int(moderate.sum())} where the FP32 prob is < 0.99, "
              f"lowest {float(fp32['probs'][overflow].min()):.3f}), "
              f"{int(np.isneginf(pooled).sum())} -inf; max map logit x sharpness "
              f"{r * logits.max():.1f}")
    assert np.isposinf(pooled[overflow]).all()  # (a sum of smaller terms may overflow too)
    assert moderate.any()


def test_fp16_models_reproduce_the_golden_scores(
        manifest: Manifest, golden: GoldenSet, models: dict[str, tuple[Any, Any]],
        golden_feed: dict[str, np.ndarray], capsys: pytest.CaptureFixture[str]) -> None:
    """Both models in FP16 (ONNX Runtime CPU) score the golden items within its tolerance."""
    tolerance = float(manifest.golden["tolerance"])
    inspector = ItemInspector(
        manifest, InMemoryBackend(manifest.model("embedding"), models["embedding"][1]),
        InMemoryBackend(manifest.model("damage"), models["damage"][1]),
        gallery=ReferenceGallery(None), catalogue=load_catalogue(),
        cfg=ModelsConfig(manifest=DEFAULT_MANIFEST, max_batch=8))
    results = golden_scores(inspector, golden)
    diffs = {}
    for key in COMPARED:
        want = golden.expected[key]
        got = np.array([np.nan if getattr(x, key) is None else getattr(x, key)
                        for x in results], np.float64)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        diffs[key] = float(np.nanmax(np.abs(got - want)))
    fp32 = _run(models["damage"][0], golden_feed)
    fp16 = _run(models["damage"][1], golden_feed)
    raw = {k: float(np.abs(fp32[k] - fp16[k]).max()) for k in ("probs", "maps")}
    with capsys.disabled():
        print(f"\nFP16 vs stored golden scores max abs diff: {diffs}; damage outputs on the "
              f"golden crops FP16 vs FP32: {raw} (tolerance {tolerance})")
    assert max(diffs.values()) <= tolerance
    assert max(raw.values()) <= tolerance


@pytest.mark.parametrize("runtime", ["onnxruntime", "reference"])
def test_fp16_damage_head_stays_finite_on_extreme_logits(
        runtime: str, models: dict[str, tuple[Any, Any]], extreme_feed: dict[str, np.ndarray],
        extreme_fp32: dict[str, np.ndarray], manifest: Manifest,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Map logits far past the FP16 exp limit: FP16 pooled logits stay finite, agree with FP32."""
    tolerance = float(manifest.golden["tolerance"])
    r = _sharpness(models["damage"][0])
    fp32 = extreme_fp32
    if runtime == "onnxruntime":
        fp16 = _run(models["damage"][1], extreme_feed)
    else:  # numpy, every op in FP16 (slow: only where the old pooling overflowed to a wrong
        # answer, and the largest logits)
        top = fp32["map_logits"].reshape(len(fp32["probs"]), -1).max(axis=1)
        pick = (_overflows(fp32, r) & (fp32["probs"] < 0.99)).any(axis=1) | (top >= top.max())
        fp32 = {k: v[pick] for k, v in fp32.items()}
        fp16 = _evaluate(models["damage"][1], list(fp32),
                         {k: v[pick] for k, v in extreme_feed.items()})
    assert r * fp32["map_logits"].max() > 4 * FP16_EXP_LIMIT
    for key in ("probs", "maps", "pooled_logits"):
        assert np.isfinite(fp16[key]).all(), key
    # Logits reach ~90: compare them relative to their size (FP16 has 11 significant bits).
    rel = np.abs(fp16["pooled_logits"] - fp32["pooled_logits"]) / np.maximum(
        1.0, np.abs(fp32["pooled_logits"]))
    diffs = {k: float(np.abs(fp32[k] - fp16[k]).max()) for k in ("probs", "maps")}
    with capsys.disabled():
        print(f"\nFP16 ({runtime}) vs FP32 on {len(fp32['probs'])} extreme inputs, max abs "
              f"diff: {diffs}; pooled logits max relative diff {float(rel.max()):.2e}; largest "
              f"map logit x sharpness {r * float(fp32['map_logits'].max()):.0f}")
    assert max(diffs.values()) <= tolerance
    assert float(rel.max()) < 0.02
