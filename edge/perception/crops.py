"""Cutting items out of frames: the measured 3D box and the rectified model crop.

The item finder (`edge.perception.segmentation`) and the training-set writer (`edge.sim.dataset`)
both go through these two functions, so the models see at run time exactly
the kind of crop they were trained on.
"""

from __future__ import annotations

import cv2
import numpy as np

from edge.perception.belt_plane import BeltPlane
from edge.types import BoolArray, F32Array, ItemCrop, U8Array, U16Array

#: Context kept around the item in a crop, as a fraction of its long side (spills lie beside it).
CROP_MARGIN = 0.12
#: Percentile of item-pixel heights taken as the item's height (robust to noise and flaps).
HEIGHT_PERCENTILE = 90.0


def measure_box(plane: BeltPlane, depth: U16Array, depth_scale_m: float, mask: BoolArray,
                origin: tuple[int, int] = (0, 0)
                ) -> tuple[tuple[float, float, float], tuple[float, float], float]:
    """Length, width, height (mm), belt-frame centre (x, y) and yaw (rad) of one item.

    `mask` covers the part of the image whose top-left pixel is `origin` (x, y): an item's
    bounding box rather than the whole frame, so that the cost follows the item's size.
    The footprint is the minimum-area rectangle of the item's 3D points
    projected onto the belt (side faces seen by an oblique camera project
    into the same footprint); the height is a high percentile of the heights.
    """
    x0, y0 = origin
    h, w = mask.shape
    valid = mask & (depth[y0:y0 + h, x0:x0 + w] > 0)
    rows, cols = np.nonzero(valid)
    if rows.size < 8:
        return (0.0, 0.0, 0.0), (float("nan"), float("nan")), 0.0
    rows += y0
    cols += x0
    z = depth[rows, cols].astype(np.float32) * np.float32(depth_scale_m * 1000.0)
    rays = plane.rays[rows, cols]
    t = plane.pose.translation_mm.astype(np.float32)
    pts = z[:, None] * rays + t
    heights = pts[:, 2]
    high = float(np.percentile(heights, HEIGHT_PERCENTILE))
    # The median of the upper surface: unbiased by noise, still lowered by a dent.
    top = float(np.median(heights[heights > 0.7 * high]))
    # Pixels well below the top are side faces; points near the belt blur the footprint edge.
    keep = heights > 0.25 * top
    xy = pts[keep, :2] if int(keep.sum()) >= 8 else pts[:, :2]
    (cx, cy), (a, b), angle = cv2.minAreaRect(xy.astype(np.float32))
    yaw = np.deg2rad(angle)
    if b > a:
        a, b = b, a
        yaw += np.pi / 2
    yaw = (yaw + np.pi / 2) % np.pi - np.pi / 2
    return (float(a), float(b), top), (float(cx), float(cy)), float(yaw)


def rectify_item(camera_id: str, color: U8Array, height_mm: F32Array, mask: BoolArray, size: int,
                 truth_damage: BoolArray | None = None) -> ItemCrop:
    """Rotate the item's image footprint so its long side lies along x; crop to size x size.

    `height_mm` is the full-frame height map (NaN = no depth). Scale is chosen
    per item so that the long side plus margins fills the crop. `truth_damage`
    (synthetic runs) is warped as given: the caller limits it to this item and
    the belt around it.
    """
    # The rectangle depends only on the convex hull: the outline gives the same one, far
    # faster than every pixel of the mask.
    outline, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                  cv2.CHAIN_APPROX_NONE)
    if not outline:
        raise ValueError(f"camera {camera_id}: empty item mask")
    (cx, cy), (w, h), angle = cv2.minAreaRect(np.concatenate(outline))
    if h > w:
        w, h = h, w
        angle += 90.0
    long_side = max(w, 4.0)
    scale = size / (long_side * (1.0 + 2.0 * CROP_MARGIN))
    m = cv2.getRotationMatrix2D((cx, cy), angle, scale)
    m[:, 2] += np.array([size / 2.0 - cx, size / 2.0 - cy])
    dsize = (size, size)
    crop_color = cv2.warpAffine(color, m, dsize, flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_REPLICATE)
    has_depth = bool(np.isfinite(height_mm[mask]).any())
    heights = np.nan_to_num(height_mm, nan=0.0)
    crop_height = cv2.warpAffine(heights, m, dsize, flags=cv2.INTER_NEAREST,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    crop_mask = cv2.warpAffine(mask.astype(np.uint8), m, dsize, flags=cv2.INTER_NEAREST) > 0
    damage = None
    if truth_damage is not None:
        damage = cv2.warpAffine(truth_damage.astype(np.uint8), m, dsize,
                                flags=cv2.INTER_NEAREST) > 0
    return ItemCrop(camera_id=camera_id, color=np.asarray(crop_color, dtype=np.uint8),
                    height_mm=np.asarray(crop_height, dtype=np.float32),
                    mask=crop_mask, has_depth=has_depth, truth_damage=damage)
