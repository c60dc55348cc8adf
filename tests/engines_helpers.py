"""A copy of the shipped engines whose golden set no longer matches the models."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import yaml

from edge.infer.manifest import sha256_file

REPO = Path(__file__).resolve().parent.parent


def engines_that_miss_their_golden_scores(folder: Path) -> Path:
    """The shipped engines copied to `folder`, the golden set expecting other damage scores
    (its checksum updated to match); returns the copy's manifest."""
    engines = folder / "engines"
    shutil.copytree(REPO / "engines", engines)
    golden = engines / "golden" / "golden.npz"
    with np.load(golden, allow_pickle=False) as d:
        arrays = {k: d[k] for k in d.files}
    arrays["expected_damage"] = np.clip(arrays["expected_damage"] + 0.3, 0.0, 1.0)
    np.savez(golden, **arrays)
    manifest = engines / "manifest.yaml"
    text = manifest.read_text()
    old_sha = yaml.safe_load(text)["golden"]["sha256"]
    manifest.write_text(text.replace(old_sha, sha256_file(golden)))
    return manifest


def engines_with_another_embedding(folder: Path) -> Path:
    """The shipped engines copied to `folder` with another embedding model of the same shape
    (the first convolution's weights perturbed, as a retrained backbone would differ), its
    manifest entry and golden expectations updated to match: a valid model update whose
    patch features differ from the shipped model's. Returns the copy's manifest."""
    import onnx
    from onnx import numpy_helper

    from edge.commands.models import memory_inspector
    from edge.config import ModelsConfig
    from edge.infer.golden import golden_scores, load_golden, stage_expectations

    engines = folder / "engines"
    shutil.copytree(REPO / "engines", engines,
                    ignore=shutil.ignore_patterns("*.pt", "MODEL_CARD.md"))
    onnx_path = engines / "embedding" / "embedding.onnx"
    model = onnx.load(str(onnx_path))
    first = next(t for t in model.graph.initializer if t.name not in ("mean_bgr", "std_bgr"))
    weights = numpy_helper.to_array(first)
    rng = np.random.default_rng(0)
    noisy = weights * (1.0 + 0.5 * rng.standard_normal(weights.shape)).astype(np.float32)
    first.CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), first.name))
    onnx.save(model, str(onnx_path))
    manifest = engines / "manifest.yaml"
    data = yaml.safe_load(manifest.read_text())
    data["models"]["embedding"]["sha256"] = sha256_file(onnx_path)
    data["models"]["embedding"]["version"] = "2.0.0+test"
    manifest.write_text(yaml.safe_dump(data, sort_keys=False))
    golden = engines / "golden" / "golden.npz"
    inspector = memory_inspector(ModelsConfig(manifest=manifest, max_batch=8), None)
    results = golden_scores(inspector, load_golden(golden))
    inspector.close()
    stage_expectations(golden, {
        "damage": np.array([r.damage for r in results]),
        "anomaly_raw": np.array([np.nan if r.anomaly_raw is None else r.anomaly_raw
                                 for r in results]),
        "fused": np.array([r.fused for r in results])}).replace(golden)
    data["golden"]["sha256"] = sha256_file(golden)
    manifest.write_text(yaml.safe_dump(data, sort_keys=False))
    return manifest
