"""The shipped ONNX models agree with the torch modules they were exported from."""

from __future__ import annotations

import numpy as np
import pytest

from edge.config import DEFAULT_MANIFEST
from edge.infer.manifest import load_manifest
from edge.infer.onnxruntime import OnnxRuntimeBackend

torch = pytest.importorskip("torch", reason="torch is a training dependency; the node never "
                            "imports it (CI installs it)")


TOLERANCE = 1e-4


def test_embedding_onnx_matches_torch_backbone(capsys: pytest.CaptureFixture[str]) -> None:
    """ONNX Runtime and torch give the same patch and trunk features (max abs diff reported)."""
    from edge.training.effnet import Trunk, load_lite0

    spec = load_manifest(DEFAULT_MANIFEST).model("embedding")
    rgb = np.random.default_rng(0).uniform(0, 255, (3, 3, 128, 128)).astype(np.float32)
    ort = OnnxRuntimeBackend(spec).run({"rgb": rgb})
    with torch.no_grad():
        patches, trunk = Trunk(load_lite0()).eval()(torch.from_numpy(rgb))
    diffs = {"patches": float(np.abs(ort["patches"] - patches.numpy()).max()),
             "trunk": float(np.abs(ort["trunk"] - trunk.numpy()).max())}
    with capsys.disabled():
        print(f"\nembedding ONNX Runtime vs torch max abs diff: {diffs}")
    assert max(diffs.values()) < TOLERANCE * 10  # trunk values reach ~10; relative ~1e-5


def test_damage_onnx_matches_torch_head(capsys: pytest.CaptureFixture[str]) -> None:
    """The damage head's probabilities and maps agree between ONNX Runtime and torch."""
    from edge.training.heads import DamageHead

    spec = load_manifest(DEFAULT_MANIFEST).model("damage")
    head = DamageHead()
    head.load_state_dict(torch.load(spec.path.with_name("damage_head.pt"), weights_only=True))
    head.eval()
    rng = np.random.default_rng(1)
    feed = {"trunk": rng.uniform(0, 6, (4, 80, 8, 8)).astype(np.float32),
            "depth": rng.uniform(0, 1, (4, 3, 128, 128)).astype(np.float32)}
    ort = OnnxRuntimeBackend(spec).run(feed)
    with torch.no_grad():
        probs, maps = head(torch.from_numpy(feed["trunk"]), torch.from_numpy(feed["depth"]))
    diff = max(float(np.abs(ort["probs"] - probs.numpy()).max()),
               float(np.abs(ort["maps"] - maps.numpy()).max()))
    with capsys.disabled():
        print(f"\ndamage ONNX Runtime vs torch max abs diff: {diff:.2e}")
    assert diff < TOLERANCE
