"""INT8 for TensorRT: a synthetic calibration set and the golden-set check against FP16.

The calibration inputs are the shipped reference views and golden items,
preprocessed exactly as at run time (the damage model's `trunk` input comes
from the embedding model on ONNX Runtime). An INT8 plan is accepted only if
its outputs on the golden items stay within a tolerance of the FP16 plan's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import structlog

from edge.infer.backend import Backend, Tensor
from edge.infer.golden import load_golden
from edge.infer.inspector import DAMAGE, EMBEDDING, depth_channels, rgb_channels
from edge.infer.manifest import Manifest, ModelSpec
from edge.infer.onnxruntime import OnnxRuntimeBackend

log = structlog.get_logger(__name__)

#: Largest output difference INT8 may show against FP16, relative to the output's range.
INT8_TOLERANCE = 0.05
Batches = list[dict[str, Tensor]]


def calibration_batches(manifest: Manifest, batch: int = 8) -> dict[str, Batches]:
    """Model inputs for calibration, per model name, in batches of `batch`."""
    size = int(manifest.model(EMBEDDING).preprocessing.get("size", 128))
    scale = float(manifest.model(DAMAGE).preprocessing.get("height_scale_mm", 200.0))
    golden = load_golden(manifest.path.parent / str(manifest.golden["file"]))
    crops = [c for r in golden.records for c in r.crops.values()]
    colors = [c.color for c in crops] + [img for _, _, img in golden.references]
    rgb = np.zeros((len(colors), 3, size, size), np.float32)
    for i, color in enumerate(colors):
        rgb_channels(color, size, rgb[i])
    depth = np.zeros((len(crops), 3, size, size), np.float32)
    for i, crop in enumerate(crops):
        depth_channels(crop, size, scale, depth[i])
    trunk = OnnxRuntimeBackend(manifest.model(EMBEDDING)).run({"rgb": rgb[:len(crops)]})["trunk"]
    return {
        EMBEDDING: [{"rgb": rgb[i:i + batch]} for i in range(0, len(rgb), batch)],
        DAMAGE: [{"trunk": trunk[i:i + batch], "depth": depth[i:i + batch]}
                 for i in range(0, len(crops), batch)],
    }


def output_disagreement(a: Backend, b: Backend, batches: Sequence[Mapping[str, Tensor]]) -> float:
    """Largest |a - b| over all outputs and batches, relative to max(1, |a|) per output."""
    worst = 0.0
    for feed in batches:
        out_a, out_b = a.run(feed), b.run(feed)
        for name, va in out_a.items():
            scale = max(1.0, float(np.abs(va).max()))
            worst = max(worst, float(np.abs(va - out_b[name]).max()) / scale)
    return worst


def int8_acceptance(spec: ModelSpec, fp16_plan: Path, batches: Sequence[Mapping[str, Tensor]],
                    open_plan: Callable[[ModelSpec, Path], Backend],
                    tolerance: float = INT8_TOLERANCE) -> Callable[[Path], bool]:
    """The `accept` callback for `EngineCache.ensure(..., "int8")`."""
    def accept(int8_plan: Path) -> bool:
        fp16, int8 = open_plan(spec, fp16_plan), open_plan(spec, int8_plan)
        try:
            diff = output_disagreement(fp16, int8, batches)
        finally:
            fp16.close()
            int8.close()
        log.info("int8_golden_check", model=spec.name, max_rel_diff=round(diff, 5),
                 tolerance=tolerance, accepted=diff <= tolerance)
        return diff <= tolerance
    return accept
