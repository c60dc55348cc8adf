"""Training loop of the damage head on cached backbone features (CPU, minutes)."""

from __future__ import annotations

import time

import torch
from torch import nn

from edge.training.features import CropTensors
from edge.training.heads import DamageHead

#: Share of training samples shown without depth (a camera whose depth fails).
DEPTH_DROPOUT = 0.3
MAP_WEIGHT = 0.5
TYPE_WEIGHT = 0.5


def train_head(data: CropTensors, *, epochs: int, seed: int, batch: int = 64,
               lr: float = 2e-3) -> DamageHead:
    torch.manual_seed(seed)
    head = DamageHead()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    n = len(data.trunk)
    steps = epochs * ((n + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    bce = nn.BCEWithLogitsLoss(reduction="none")
    for epoch in range(epochs):
        start, total = time.monotonic(), 0.0
        head.train()
        for idx in torch.split(torch.randperm(n), batch):
            depth = data.depth[idx].float()
            drop = torch.rand(len(idx)) < DEPTH_DROPOUT
            depth[drop] = 0.0
            pooled, maps = head.logits(data.trunk[idx], depth)
            y = data.targets[idx]
            loss_any = bce(pooled[:, 0], y[:, 0]).mean()
            loss_types = bce(pooled[:, 1:], y[:, 1:]).mean()
            known = data.map_known[idx]
            map_loss = bce(maps[:, 0], data.map_target[idx]).mean(dim=(1, 2))
            loss_map = (map_loss * known).sum() / known.sum().clamp(min=1.0)
            loss = loss_any + TYPE_WEIGHT * loss_types + MAP_WEIGHT * loss_map
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1}/{epochs} loss {total / n:.4f} ({time.monotonic() - start:.1f} s)",
              flush=True)
    return head.eval()
