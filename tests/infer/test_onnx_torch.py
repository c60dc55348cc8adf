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
    """ONNX Runtime and torch give the same outputs (max abs diff reported): patch and trunk
    features, the parcel prior and the novelty distance."""
    from edge.training.effnet import Trunk, load_lite0

    spec = load_manifest(DEFAULT_MANIFEST).model("embedding")
    size = int(spec.preprocessing["size"])
    rgb = np.random.default_rng(0).uniform(0, 255, (3, 3, size, size)).astype(np.float32)
    ort = OnnxRuntimeBackend(spec).run({"rgb": rgb})
    with torch.no_grad():
        twin = Trunk(load_lite0()).eval()
        if "novelty" in ort:  # models with out-of-distribution outputs
            twin.load_novelty(spec.path)
        outputs = dict(zip(("patches", "trunk", "parcel", "novelty"),
                           twin(torch.from_numpy(rgb)), strict=True))
    diffs = {name: float(np.abs(ort[name] - value.numpy()).max())
             for name, value in outputs.items() if name in ort}
    with capsys.disabled():
        print(f"\nembedding ONNX Runtime vs torch max abs diff: {diffs}")
    # Features reach ~10 (relative ~1e-5); novelty is a sum of thousands of squares (~1e3).
    assert max(v for k, v in diffs.items() if k != "novelty") < TOLERANCE * 10
    if "novelty" in diffs:
        assert diffs["novelty"] <= 1e-5 * float(np.abs(ort["novelty"]).max())


def test_damage_onnx_matches_torch_head(capsys: pytest.CaptureFixture[str]) -> None:
    """The damage head's probabilities and maps agree between ONNX Runtime and torch."""
    from edge.training.heads import DamageHead

    spec = load_manifest(DEFAULT_MANIFEST).model("damage")
    head = DamageHead()
    head.load_state_dict(torch.load(spec.path.with_name("damage_head.pt"), weights_only=True))
    head.eval()
    rng = np.random.default_rng(1)
    size = int(spec.preprocessing["size"])
    feed = {"trunk": rng.uniform(0, 6, (4, 80, size // 16, size // 16)).astype(np.float32),
            "depth": rng.uniform(0, 1, (4, 3, size, size)).astype(np.float32)}
    ort = OnnxRuntimeBackend(spec).run(feed)
    with torch.no_grad():
        probs, maps = head(torch.from_numpy(feed["trunk"]), torch.from_numpy(feed["depth"]))
    diff = max(float(np.abs(ort["probs"] - probs.numpy()).max()),
               float(np.abs(ort["maps"] - maps.numpy()).max()))
    with capsys.disabled():
        print(f"\ndamage ONNX Runtime vs torch max abs diff: {diff:.2e}")
    assert diff < TOLERANCE
