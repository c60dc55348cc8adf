"""Training tensors from a synthetic dataset, with the frozen backbone's features cached once."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edge.infer.dataset import Dataset
from edge.infer.inspector import TYPE_NAMES, depth_channels, rgb_channels
from edge.training.effnet import Trunk
from edge.training.progress import ProgressBar
from edge.types import BoolArray

HEIGHT_SCALE_MM = 200.0


@dataclass
class CropTensors:
    trunk: torch.Tensor  # (N, 80, 8, 8), float32 (variant-major: all originals, then rot180)
    depth: torch.Tensor  # (N, 3, S, S), float16
    targets: torch.Tensor  # (N, 6): any damage + per type
    map_target: torch.Tensor  # (N, 8, 8): damaged cells (any damage)
    map_known: torch.Tensor  # (N,): the crop has a damage mask to supervise the map
    pooled: torch.Tensor  # (N / 2, 1280): the originals' pooled head features (novelty fit)


def _crop_labels(damage: str | None, truth_mask: np.ndarray | None) -> np.ndarray:
    y = np.zeros(1 + len(TYPE_NAMES), np.float32)
    if damage is None:
        return y
    visible = truth_mask is None or bool(truth_mask.any())
    y[0] = 1.0 if visible else 0.0
    if damage in TYPE_NAMES and visible:
        y[1 + TYPE_NAMES.index(damage)] = 1.0
    return y


def damage_cells(mask: BoolArray | None, cells: int) -> np.ndarray:
    """Damaged cells (1.0) of the head's `cells` x `cells` output grid; all 0 without a mask."""
    if mask is None:
        return np.zeros((cells, cells), np.float32)
    s = mask.shape[0] // cells
    grid: np.ndarray = mask[: s * cells, : s * cells].reshape(cells, s, cells, s).max(axis=(1, 3))
    return grid.astype(np.float32)


def build(dataset: Dataset, trunk: Trunk, size: int, batch: int = 64) -> CropTensors:
    """Every crop of every item, plus its 180-degree rotation (the other travel direction)."""
    colors, depths, labels, maps, known = [], [], [], [], []
    cells = size // 16
    for rec in dataset.items:
        damage = None if rec.truth is None or rec.truth.damage is None else rec.truth.damage.value
        for crop in rec.crops.values():
            rgb = np.empty((3, size, size), np.float32)
            rgb_channels(crop.color, size, rgb, to_rgb=True)
            d = np.empty((3, size, size), np.float32)
            depth_channels(crop, size, HEIGHT_SCALE_MM, d)
            colors.append(rgb)
            depths.append(d.astype(np.float16))
            labels.append(_crop_labels(damage, crop.truth_damage))
            maps.append(damage_cells(crop.truth_damage, cells))
            known.append(crop.truth_damage is not None or damage is None)
    rgb_all = torch.from_numpy(np.stack(colors))
    del colors
    feats, pooled = [], []
    bar = ProgressBar()
    with torch.no_grad():
        for i in range(0, len(rgb_all), batch):
            _, x, p, _ = trunk.features(rgb_all[i:i + batch])
            feats.append(x)
            pooled.append(p)
            bar("features", min(1.0, (i + batch) / (2 * len(rgb_all))))
        # The other travel direction, under other light and optics: the head's input only.
        gen = torch.Generator().manual_seed(len(rgb_all))
        for i in range(0, len(rgb_all), batch):
            flipped = torch.flip(rgb_all[i:i + batch], dims=(2, 3))
            feats.append(trunk.trunk_only(photometric_jitter(flipped, gen)))
            bar("features", min(1.0, (len(rgb_all) + i + batch) / (2 * len(rgb_all))))
    bar.done()
    depth = torch.from_numpy(np.stack(depths))
    y = torch.from_numpy(np.stack(labels))
    m = torch.from_numpy(np.stack(maps).astype(np.float32))
    k = torch.from_numpy(np.array(known, dtype=np.float32))
    return CropTensors(
        trunk=torch.cat(feats),
        depth=torch.cat([depth, torch.flip(depth, dims=(2, 3))]),
        targets=torch.cat([y, y]),
        map_target=torch.cat([m, torch.flip(m, dims=(1, 2))]),
        map_known=torch.cat([k, k]),
        pooled=torch.cat(pooled),
    )


def photometric_jitter(rgb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random exposure, colour temperature, offset, sensor noise and defocus per crop
    (values 0..255): what differs between renders and real cameras, not what damage is."""
    n = len(rgb)

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, *shape, generator=gen)

    x = rgb * uniform(0.6, 1.4, 1, 1, 1) * uniform(0.85, 1.15, 3, 1, 1)
    x = x + uniform(-20.0, 20.0, 1, 1, 1)
    x = x + torch.randn(x.shape, generator=gen) * uniform(0.0, 6.0, 1, 1, 1)
    blur = torch.rand(n, generator=gen) < 0.3
    if blur.any():
        x[blur] = nn.functional.avg_pool2d(x[blur], 3, 1, 1, count_include_pad=False)
    return x.clamp(0.0, 255.0)
