"""INT8 for TensorRT: a synthetic calibration set and the golden-set check against FP16.

The calibration inputs are the shipped reference views and golden items,
preprocessed exactly as at run time (the damage model's `trunk` input comes
from the embedding model on ONNX Runtime). An INT8 plan is accepted only if
its outputs on held-out golden items and views (disjoint from the calibration
set: `int8_sets`) stay within a tolerance of the FP16 plan's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog

from edge.infer.backend import Backend, Tensor
from edge.infer.golden import load_golden
from edge.infer.inspector import (
    DAMAGE,
    EMBEDDING,
    channel_order_is_rgb,
    depth_channels,
    rgb_channels,
)
from edge.infer.manifest import Manifest, ModelSpec
from edge.infer.onnxruntime import OnnxRuntimeBackend

log = structlog.get_logger(__name__)

#: Largest output difference INT8 may show against FP16, relative to the output's range.
INT8_TOLERANCE = 0.05
#: Every CHECK_EVERY-th golden item (both its views) and shipped reference view is held out
#: of calibration for the acceptance check; the rest calibrate.
CHECK_EVERY = 3
Batches = list[dict[str, Tensor]]


@dataclass(frozen=True, slots=True)
class Int8Sets:
    """Per model name: batches to calibrate on, and disjoint batches to check INT8 against FP16."""

    calibration: dict[str, Batches]
    check: dict[str, Batches]


def _batched(arrays: Mapping[str, np.ndarray], keep: np.ndarray, batch: int) -> Batches:
    picked = {k: v[keep] for k, v in arrays.items()}
    n = int(keep.sum())
    return [{k: v[i:i + batch] for k, v in picked.items()} for i in range(0, n, batch)]


def int8_sets(manifest: Manifest, batch: int = 8) -> Int8Sets:
    """Model inputs for calibration and for the acceptance check, in batches of `batch`.

    Split deterministically and disjointly: golden item i (both its views) and reference
    view k go to the check when i (k) % CHECK_EVERY == CHECK_EVERY - 1, else to calibration;
    a plan is never judged on the inputs it was calibrated on."""
    size = int(manifest.model(EMBEDDING).preprocessing.get("size", 128))
    scale = float(manifest.model(DAMAGE).preprocessing.get("height_scale_mm", 200.0))
    golden = load_golden(manifest.path.parent / str(manifest.golden["file"]))
    crops = [(i, c) for i, r in enumerate(golden.records) for c in r.crops.values()]
    held = np.array([i % CHECK_EVERY == CHECK_EVERY - 1 for i, _ in crops], bool)
    ref_held = np.array([k % CHECK_EVERY == CHECK_EVERY - 1
                         for k in range(len(golden.references))], bool)
    colors = [c.color for _, c in crops] + [img for _, _, img in golden.references]
    rgb = np.zeros((len(colors), 3, size, size), np.float32)
    for i, color in enumerate(colors):
        rgb_channels(color, size, rgb[i], to_rgb=channel_order_is_rgb(manifest))
    depth = np.zeros((len(crops), 3, size, size), np.float32)
    for i, (_, crop) in enumerate(crops):
        depth_channels(crop, size, scale, depth[i])
    trunk = OnnxRuntimeBackend(manifest.model(EMBEDDING)).run({"rgb": rgb[:len(crops)]})["trunk"]
    color_held = np.concatenate([held, ref_held])
    embedding = {"rgb": rgb}
    damage = {"trunk": trunk, "depth": depth}
    return Int8Sets(
        calibration={EMBEDDING: _batched(embedding, ~color_held, batch),
                     DAMAGE: _batched(damage, ~held, batch)},
        check={EMBEDDING: _batched(embedding, color_held, batch),
               DAMAGE: _batched(damage, held, batch)})


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
