"""The damage head (trunk features + depth branch) and ONNX export of both models."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from edge.training.effnet import Trunk

TRUNK_CHANNELS = 80
PATCH_CHANNELS = 120
N_OUTPUTS = 6  # any damage + the classifier's five types
LSE_R = 5.0


def log_mean_exp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """log(mean(exp(x))) along `dim`, max-subtracted: m + log(mean(exp(x - m))).

    Equal to `logsumexp(x) - log(n)`, but the exported graph (ReduceMax, Sub, Exp,
    ReduceMean, Log, Add) only exponentiates values <= 0, so it cannot overflow in FP16.
    `torch.logsumexp` exports as `ReduceLogSumExp`, which TensorRT may lower to a plain
    exp -> sum -> log: in FP16, exp overflows (> 65504) once an argument exceeds ~11.09.
    """
    m = x.amax(dim=dim, keepdim=True).detach()  # the gradient is softmax(x) either way
    return (m + torch.log(torch.exp(x - m).mean(dim=dim, keepdim=True))).squeeze(dim)


class DamageHead(nn.Module):
    """(trunk [N,80,8,8], depth [N,3,S,S]) -> probs [N,6], maps [N,6,8,8].

    The fusing layers are 1x1: each cell of the grid is judged on its own features. With
    3x3 layers the head learnt the layout of the training products' artwork and generalized
    worse to products it never saw (the model card's figures are on such products)."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = nn.Sequential(
            nn.Conv2d(3, 16, 4, 4), nn.ReLU(),
            nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU(),
        )
        self.fuse = nn.Sequential(
            nn.Conv2d(TRUNK_CHANNELS + 32, 96, 1), nn.BatchNorm2d(96), nn.ReLU(),
            nn.Dropout2d(0.1),
            nn.Conv2d(96, 64, 1), nn.ReLU(),
            nn.Conv2d(64, N_OUTPUTS, 1),
        )

    def logits(self, trunk: torch.Tensor,
               depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.depth(depth)  # stride 16: the trunk's grid
        maps = self.fuse(torch.cat([trunk, d], dim=1))
        pooled = log_mean_exp(LSE_R * maps.flatten(2), dim=2) / LSE_R
        return pooled, maps

    def forward(self, trunk: torch.Tensor,
                depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, maps = self.logits(trunk, depth)
        return torch.sigmoid(pooled), torch.sigmoid(maps)


def pin_output_shapes(path: Path, shapes: dict[str, tuple[int | str, ...]]) -> None:
    """Write the static output dimensions the exporter left symbolic (e.g. after LogSumExp)."""
    import onnx

    model = onnx.load(str(path))
    for out in model.graph.output:
        for dim, want in zip(out.type.tensor_type.shape.dim, shapes[out.name], strict=True):
            if isinstance(want, int):
                dim.Clear()
                dim.dim_value = want
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def separate_outputs(path: Path) -> None:
    """Give every graph output that other nodes also consume a tensor of its own (an
    Identity): FP16 converters that keep float32 outputs (`keep_io_types`) otherwise cast
    the shared tensor for the output and leave its consumers on the other type."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    consumed = {name for node in model.graph.node for name in node.input}
    for out in model.graph.output:
        if out.name in consumed:
            inner = f"{out.name}_value"
            for node in model.graph.node:
                node.input[:] = [inner if n == out.name else n for n in node.input]
                node.output[:] = [inner if n == out.name else n for n in node.output]
            model.graph.node.append(helper.make_node("Identity", [inner], [out.name]))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def export_embedding(trunk: Trunk, path: Path, size: int) -> None:
    dummy = torch.zeros(1, 3, size, size)
    names = ["patches", "trunk", "parcel", "novelty"]
    torch.onnx.export(trunk.eval(), (dummy,), str(path), input_names=["rgb"],
                      output_names=names, opset_version=17,
                      dynamic_axes={"rgb": {0: "batch"}, **{n: {0: "batch"} for n in names}},
                      dynamo=False)
    pin_output_shapes(path, {"patches": ("batch", PATCH_CHANNELS, size // 8, size // 8),
                             "trunk": ("batch", TRUNK_CHANNELS, size // 16, size // 16),
                             "parcel": ("batch", 1), "novelty": ("batch", 1)})
    separate_outputs(path)


def export_damage(head: DamageHead, path: Path, size: int) -> None:
    cells = size // 16
    trunk = torch.zeros(1, TRUNK_CHANNELS, cells, cells)
    depth = torch.zeros(1, 3, size, size)
    torch.onnx.export(head.eval(), (trunk, depth), str(path), input_names=["trunk", "depth"],
                      output_names=["probs", "maps"], opset_version=17,
                      dynamic_axes={"trunk": {0: "batch"}, "depth": {0: "batch"},
                                    "probs": {0: "batch"}, "maps": {0: "batch"}}, dynamo=False)
    pin_output_shapes(path, {"probs": ("batch", N_OUTPUTS),
                             "maps": ("batch", N_OUTPUTS, cells, cells)})
