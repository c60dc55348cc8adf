"""Shared scene builders for the perception tests: exact box renders and the top segmenter."""

from __future__ import annotations

import dataclasses

import numpy as np

from edge.config import load_config
from edge.perception.segmentation import ItemSegmenter
from edge.sim.conveyor import default_intrinsics, default_pose
from edge.types import Frame

START_MS = 1.7e12
CFG = load_config(None)


# -- analytic scenes: boxes rendered exactly (top faces) for the geometry and splits ----------


def render_boxes(boxes: list[tuple[float, float, float, float, float, float]]) -> Frame:
    """Depth of the top camera seeing flat-topped boxes (x, y, yaw, length, width, height)."""
    intr = default_intrinsics(640, 480)
    seg = ItemSegmenter("top", intr, default_pose(0), CFG.items)
    rays, t = seg.plane.rays.astype(np.float64), seg.plane.pose.translation_mm
    depth = seg.plane.belt_depth_mm.astype(np.float64)
    for x, y, yaw, length, width, height in boxes:
        z = (height - t[2]) / rays[..., 2]
        px = z * rays[..., 0] + t[0] - x
        py = z * rays[..., 1] + t[1] - y
        u = np.cos(yaw) * px + np.sin(yaw) * py
        v = -np.sin(yaw) * px + np.cos(yaw) * py
        inside = (np.abs(u) <= length / 2) & (np.abs(v) <= width / 2)
        depth = np.where(inside & (z < depth), z, depth)
    return Frame("top", 0, START_MS, np.full((480, 640, 3), 90, np.uint8),
                 np.round(depth).astype(np.uint16), 0.001, intr)


def segmenter(**items: float) -> ItemSegmenter:
    return ItemSegmenter("top", default_intrinsics(640, 480), default_pose(0),
                         dataclasses.replace(CFG.items, **items))
