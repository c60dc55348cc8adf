"""Procedural packaging artwork and damage decals, drawn in item-top texture space.

Textures use 1 px per mm; texture x runs along the item's length, y across.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from edge.catalogue import Product
from edge.sim.world import Damage
from edge.types import DamageType, F32Array, U8Array

PX_PER_MM = 1.0


@dataclass(frozen=True, slots=True)
class TopSurface:
    """What the top of one item looks like: colour, damaged pixels, dent depth (mm)."""

    bgra: U8Array  # BGR + alpha channel = 255 where damaged
    dent_mm: F32Array | None  # depth below the nominal top, per texel (negative: raised)


def _product_seed(product_id: str) -> int:
    return int.from_bytes(product_id.encode()[:8].ljust(8, b"\0"), "little") & 0x7FFFFFFF


def _jagged_line(rng: np.random.Generator, start: tuple[float, float], length: float,
                 angle: float, steps: int = 9) -> np.ndarray:
    pts = [np.array(start, dtype=np.float64)]
    for _ in range(steps):
        angle += rng.normal(0, 0.5)
        pts.append(pts[-1] + length / steps * np.array([np.cos(angle), np.sin(angle)]))
    return np.round(np.array(pts)).astype(np.int32)


def _blob(img: U8Array, rng: np.random.Generator, centre: tuple[float, float], radius: float,
          colour: tuple[int, ...], count: int = 6) -> None:
    for _ in range(count):
        c = (int(centre[0] + rng.normal(0, radius * 0.4)),
             int(centre[1] + rng.normal(0, radius * 0.4)))
        r = max(2, int(abs(rng.normal(radius * 0.45, radius * 0.15))))
        cv2.circle(img, c, r, colour, -1, lineType=cv2.LINE_AA)


def product_artwork(product: Product, dims_mm: tuple[float, float, float]) -> U8Array:
    """The printed top of an intact item of `product` (BGR)."""
    length, width, _ = dims_mm
    tw, th = max(8, int(length * PX_PER_MM)), max(8, int(width * PX_PER_MM))
    rng = np.random.default_rng(_product_seed(product.product_id))
    base = np.array(product.colour_bgr, dtype=np.uint8)
    img = np.empty((th, tw, 3), dtype=np.uint8)
    img[:] = base
    if product.packaging == "polybag":
        # Wrinkles: soft light streaks.
        for _ in range(8):
            y = int(rng.uniform(0, th))
            cv2.line(img, (0, y), (tw, y + int(rng.normal(0, 20))),
                     tuple(int(min(255, c + 35)) for c in base), 3, lineType=cv2.LINE_AA)
    if product.artwork in ("brand", "crack_print", "stain_print"):
        logo = tuple(int(c) for c in (255 - base) // 2 + 40)
        cv2.rectangle(img, (int(tw * 0.1), int(th * 0.15)), (int(tw * 0.45), int(th * 0.45)),
                      logo, -1)
        for k in range(3):
            y = int(th * (0.6 + 0.1 * k))
            cv2.line(img, (int(tw * 0.1), y), (int(tw * (0.5 + 0.1 * k)), y), (30, 30, 30), 2)
    if product.artwork == "crack_print":
        # A picture of cracks, printed: looks like a tear, but it is flat and intact.
        for _ in range(3):
            start = (rng.uniform(0.45, 0.8) * tw, rng.uniform(0.2, 0.8) * th)
            pts = _jagged_line(rng, start, 0.35 * min(tw, th), rng.uniform(0, 2 * np.pi))
            cv2.polylines(img, [pts], False, (25, 35, 45), 3, lineType=cv2.LINE_AA)
    if product.artwork == "stain_print":
        _blob(img, rng, (0.7 * tw, 0.35 * th), 0.15 * min(tw, th), (40, 60, 90))
        _blob(img, rng, (0.3 * tw, 0.75 * th), 0.1 * min(tw, th), (45, 70, 100))
    if product.units > 1:
        along, across = product.unit_grid
        for i in range(1, along):
            x = int(tw * i / along)
            cv2.line(img, (x, 0), (x, th), (20, 20, 20), 2)
        for j in range(1, across):
            y = int(th * j / across)
            cv2.line(img, (0, y), (tw, y), (20, 20, 20), 2)
    return img


def damaged_top(product: Product, dims_mm: tuple[float, float, float],
                damage: Damage | None) -> TopSurface:
    """The top surface of one item, with its damage drawn in and the dent map."""
    colour = product_artwork(product, dims_mm)
    th, tw = colour.shape[:2]
    alpha = np.zeros((th, tw), dtype=np.uint8)
    if damage is None or damage.type is DamageType.BROKEN_SET:
        return TopSurface(np.dstack([colour, alpha]), None)
    rng = np.random.default_rng(damage.seed)
    cu = int((damage.u_mm + dims_mm[0] / 2) * PX_PER_MM)
    cv = int((damage.v_mm + dims_mm[1] / 2) * PX_PER_MM)
    size = damage.size_mm * PX_PER_MM
    dent: F32Array | None = None
    if damage.type is DamageType.CRUSH:
        yy, xx = np.mgrid[0:th, 0:tw].astype(np.float32)
        sigma = size / 2.0
        bump = np.exp(-(((xx - cu) ** 2) / (2 * sigma**2)
                        + ((yy - cv) ** 2) / (2 * (0.6 * sigma) ** 2)))
        dent = (bump * damage.depth_mm).astype(np.float32)
        shade = 1.0 - 0.45 * bump
        colour = (colour.astype(np.float32) * shade[..., None]).astype(np.uint8)
        for _ in range(4):  # creases
            pts = _jagged_line(rng, (cu + rng.normal(0, sigma / 2), cv + rng.normal(0, sigma / 2)),
                               sigma, rng.uniform(0, 2 * np.pi), steps=5)
            cv2.polylines(colour, [pts], False, (20, 20, 25), 2, lineType=cv2.LINE_AA)
        alpha[bump > 0.25] = 255
    elif damage.type is DamageType.TEAR:
        pts = _jagged_line(rng, (cu - size / 2, cv), size, rng.uniform(-0.6, 0.6), steps=10)
        flap = np.concatenate([pts, pts[::-1] + np.array([0, int(size * 0.2)])])
        cv2.fillPoly(colour, [flap], (120, 160, 190), lineType=cv2.LINE_AA)  # exposed board
        cv2.polylines(colour, [pts], False, (15, 20, 30), 4, lineType=cv2.LINE_AA)
        cv2.fillPoly(alpha, [flap], 255)
        cv2.polylines(alpha, [pts], False, 255, 6)
        dent = np.zeros((th, tw), dtype=np.float32)
        dent[alpha > 0] = -damage.depth_mm  # the flap lifts
    elif damage.type is DamageType.HOLE:
        axes = (max(3, int(size / 2)), max(3, int(size / 3)))
        angle = float(rng.uniform(0, 180))
        cv2.ellipse(colour, (cu, cv), (axes[0] + 4, axes[1] + 4), angle, 0, 360, (90, 120, 150), -1)
        cv2.ellipse(colour, (cu, cv), axes, angle, 0, 360, (10, 10, 12), -1)
        cv2.ellipse(alpha, (cu, cv), (axes[0] + 4, axes[1] + 4), angle, 0, 360, 255, -1)
        dent = np.zeros((th, tw), dtype=np.float32)
        cv2.ellipse(dent, (cu, cv), axes, angle, 0, 360, float(damage.depth_mm), -1)
    elif damage.type is DamageType.SPILL:
        # Liquid that ran over the top towards the edge (the belt part is drawn by the renderer).
        liquid = (30, 50, 85) if rng.random() < 0.5 else (225, 225, 230)
        edge_v = th - 1 if damage.v_mm >= 0 else 0
        _blob(colour, rng, (cu, (cv + edge_v) / 2), size / 2, liquid, count=8)
        diff = np.any(colour != product_artwork(product, dims_mm), axis=2)
        alpha[diff] = 255
    elif damage.type is DamageType.DECONSTRUCTION:
        # The opening the contents push through; the contents are a box drawn by the renderer.
        half = int(size * 0.35)
        cv2.rectangle(colour, (cu - half - 6, cv - half - 6), (cu + half + 6, cv + half + 6),
                      (70, 100, 130), -1)
        cv2.rectangle(alpha, (cu - half - 6, cv - half - 6), (cu + half + 6, cv + half + 6),
                      255, -1)
    return TopSurface(np.dstack([colour, alpha]), dent)


def contents_colour(seed: int) -> tuple[int, int, int]:
    """Colour of protruding contents: bright, unlike packaging."""
    rng = np.random.default_rng(seed)
    palette = [(0, 200, 255), (255, 80, 0), (0, 255, 120), (230, 0, 230), (255, 255, 0)]
    return palette[int(rng.integers(len(palette)))]


def spill_colour(seed: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(seed)
    return (30, 50, 85) if rng.random() < 0.5 else (225, 225, 230)
