"""Fine-tuning the shipped damage head on labelled crops, on features of the shipped backbone.

The backbone stays frozen and is run through ONNX Runtime, exactly as the node runs it
(`ItemInspector.embed`, `depth_channels`), so the head learns on the inputs it will see.
Every crop is used as seen and turned by 180 degrees (the other travel direction).

A site's labels say only damaged or intact: such crops train the any-damage output, and
the maps only where they are known to be empty (intact items). Synthetic crops, with their
ground truth, also train the per-type outputs and the maps, which keeps the head from
forgetting what the site did not show.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge.infer.inspector import TYPE_NAMES, ItemInspector, depth_channels
from edge.training.features import damage_cells
from edge.training.fit_head import DEPTH_DROPOUT, MAP_WEIGHT, TYPE_WEIGHT
from edge.training.heads import N_OUTPUTS, DamageHead
from edge.types import ItemCrop

#: Progress of a long step: the share of it done, 0..1.
StepProgress = Callable[[float], None]


class HeadError(RuntimeError):
    """The current head cannot be fine-tuned (its weights are missing or do not fit)."""


@dataclass(frozen=True, slots=True)
class LabelledCrop:
    """One crop and what is known about it."""

    crop: ItemCrop
    damaged: bool
    damage_type: str | None = None  # the classifier type, when known (synthetic truth)
    typed: bool = False  # the per-type outputs and the map may be trained on it
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class HeadTensors:
    """Inputs and targets of every crop; `trunk_turned` is the trunk of the crop turned by
    180 degrees (depth and maps are turned when a batch is drawn)."""

    trunk: torch.Tensor  # (N, C, H, W) float32
    trunk_turned: torch.Tensor
    depth: torch.Tensor  # (N, 3, S, S) float16, as depth_channels writes it
    targets: torch.Tensor  # (N, N_OUTPUTS): any damage, then per type
    typed: torch.Tensor  # (N,): the per-type targets are known
    map_target: torch.Tensor  # (N, H, W)
    map_known: torch.Tensor  # (N,)
    weight: torch.Tensor  # (N,)

    def __len__(self) -> int:
        return len(self.trunk)


def _targets(item: LabelledCrop) -> np.ndarray:
    y = np.zeros(N_OUTPUTS, np.float32)
    y[0] = 1.0 if item.damaged else 0.0
    if item.typed and item.damage_type in TYPE_NAMES:
        y[1 + TYPE_NAMES.index(item.damage_type)] = 1.0
    return y


def build_tensors(items: Sequence[LabelledCrop], inspector: ItemInspector,
                  progress: StepProgress | None = None, batch: int = 64) -> HeadTensors:
    """Backbone features of every crop (and of it turned), depth channels, targets."""
    size, scale = inspector.size, inspector.abs_scale_mm
    trunks: list[np.ndarray] = []
    turned: list[np.ndarray] = []
    depth = np.zeros((len(items), 3, size, size), np.float16)
    scratch = np.empty((3, size, size), np.float32)
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        colors = [i.crop.color for i in chunk]
        trunks.append(inspector.embed(colors)[1])
        turned.append(inspector.embed([np.ascontiguousarray(c[::-1, ::-1]) for c in colors])[1])
        for k, item in enumerate(chunk):
            depth_channels(item.crop, size, scale, scratch)
            depth[start + k] = scratch
        if progress is not None:
            progress(min(1.0, (start + len(chunk)) / len(items)))
    trunk = torch.from_numpy(np.concatenate(trunks)).float()
    cells = int(trunk.shape[-1])
    typed = np.array([i.typed for i in items], np.float32)
    known = np.array([i.typed or not i.damaged for i in items], np.float32)
    maps = np.stack([damage_cells(i.crop.truth_damage if i.typed else None, cells) for i in items])
    return HeadTensors(
        trunk=trunk, trunk_turned=torch.from_numpy(np.concatenate(turned)).float(),
        depth=torch.from_numpy(depth),
        targets=torch.from_numpy(np.stack([_targets(i) for i in items])),
        typed=torch.from_numpy(typed), map_target=torch.from_numpy(maps),
        map_known=torch.from_numpy(known),
        weight=torch.tensor([i.weight for i in items], dtype=torch.float32))


def load_head(path: Path) -> DamageHead:
    """The current head's torch weights (`damage_head.pt` beside `damage.onnx`)."""
    head = DamageHead()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        head.load_state_dict(state, strict=True)
    except FileNotFoundError:
        raise HeadError(f"{path}: the current damage head's weights are missing; fine-tuning "
                        "starts from them (tools/train_models.py writes them)") from None
    except (RuntimeError, OSError, ValueError) as exc:
        raise HeadError(f"{path}: the weights do not fit edge/training/heads.py DamageHead "
                        f"({str(exc).splitlines()[0]}); retrain the shipped models with "
                        "tools/train_models.py") from None
    return head.eval()


def head_outputs(head: DamageHead, data: HeadTensors, n: int) -> np.ndarray:
    """The head's any-damage probability of the first `n` crops (as the ONNX model runs)."""
    with torch.no_grad():
        probs, _ = head(data.trunk[:n], data.depth[:n].float())
    out: np.ndarray = probs[:, 0].numpy()
    return out


def _batch(data: HeadTensors, idx: torch.Tensor, rng: torch.Generator
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Trunk, depth, map target and the turned flag of crops `idx` (>= N: turned)."""
    n = len(data)
    turned = idx >= n
    base = idx % n
    trunk = torch.where(turned[:, None, None, None], data.trunk_turned[base], data.trunk[base])
    depth = data.depth[base].float()
    depth[turned] = torch.flip(depth[turned], dims=(2, 3))
    maps = data.map_target[base].clone()
    maps[turned] = torch.flip(maps[turned], dims=(1, 2))
    drop = torch.rand(len(idx), generator=rng) < DEPTH_DROPOUT
    depth[drop] = 0.0  # a camera whose depth fails
    return trunk, depth, maps, base


def finetune(head: DamageHead, data: HeadTensors, *, epochs: int, lr: float, seed: int,
             batch: int = 64, progress: StepProgress | None = None) -> list[float]:
    """Train `head` in place on `data` (each crop as seen and turned); the mean loss of each
    epoch. The learning rate decays to zero along a cosine."""
    torch.manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    samples = 2 * len(data)
    steps_per_epoch = math.ceil(samples / batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    bce = nn.BCEWithLogitsLoss(reduction="none")
    losses = []
    for epoch in range(epochs):
        head.train()
        total, seen = 0.0, 0.0
        for step, idx in enumerate(torch.split(torch.randperm(samples, generator=rng), batch)):
            trunk, depth, maps_t, base = _batch(data, idx, rng)
            pooled, maps = head.logits(trunk, depth)
            w = data.weight[base]
            y = data.targets[base]
            loss_any = bce(pooled[:, 0], y[:, 0]) * w
            typed = data.typed[base] * w
            loss_types = bce(pooled[:, 1:], y[:, 1:]).mean(dim=1) * typed
            known = data.map_known[base] * w
            loss_map = bce(maps[:, 0], maps_t).mean(dim=(1, 2)) * known
            loss = (loss_any.sum() + TYPE_WEIGHT * loss_types.sum()
                    + MAP_WEIGHT * loss_map.sum()) / w.sum().clamp(min=1e-6)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.item()) * float(w.sum())
            seen += float(w.sum())
            if progress is not None:
                progress((epoch + (step + 1) / steps_per_epoch) / epochs)
        losses.append(total / max(seen, 1e-6))
    head.eval()
    return losses
