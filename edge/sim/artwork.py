"""Item tops: packaging artwork and damage decals, drawn in item-top texture space.

Textures use 1 px per mm; texture x runs along the item's length, y across.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from edge.catalogue import Product
from edge.sim.packaging_art import blot, fixed, fixed_point, jagged, label, procedural_top
from edge.sim.world import Damage
from edge.types import DamageType, F32Array, U8Array

PX_PER_MM = 1.0
#: Share of procedurally drawn items that carry a shipping label of their own.
SHIPPING_LABEL_RATE = 0.6


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
    """The fixed look of a catalogue product without an `art_seed` (BGR)."""
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


def top_artwork(product: Product, dims_mm: tuple[float, float, float], *, unit: bool = False
                ) -> U8Array:
    """The printed top of an intact item, or of one unit of a multipack (BGR)."""
    if product.art_seed is not None:
        return procedural_top(product, dims_mm, unit=unit)
    return product_artwork(product, dims_mm)


def damaged_top(product: Product, dims_mm: tuple[float, float, float], damage: Damage | None,
                *, unit: bool = False, label_seed: int | None = None) -> TopSurface:
    """The top surface of one item (or multipack unit), with its damage drawn in and the dent
    map. `label_seed`: where and what the item's own shipping label is (procedural products).

    The damage mask is every texel the damage changed, in colour or in depth.
    """
    colour = top_artwork(product, dims_mm, unit=unit)
    if label_seed is not None and product.art_seed is not None:
        rng = np.random.default_rng([product.art_seed, label_seed])
        if rng.random() < SHIPPING_LABEL_RATE:
            colour = colour.copy()
            label(colour, rng)
    th, tw = colour.shape[:2]
    if damage is None or damage.type is DamageType.BROKEN_SET:
        return TopSurface(np.dstack([colour, np.zeros((th, tw), np.uint8)]), None)
    intact = colour
    colour = colour.copy()
    rng = np.random.default_rng(damage.seed)
    centre = ((damage.u_mm + dims_mm[0] / 2) * PX_PER_MM,
              (damage.v_mm + dims_mm[1] / 2) * PX_PER_MM)
    dent = np.zeros((th, tw), dtype=np.float32)
    _DRAW[damage.type](colour, dent, rng, centre, damage)
    changed = np.any(colour != intact, axis=2) | (dent != 0)
    if damage.type is DamageType.TEAR:
        dent[changed] = -damage.depth_mm  # the torn flap lifts wherever the tear shows
    alpha = changed.astype(np.uint8) * 255
    return TopSurface(np.dstack([colour, alpha]), dent if dent.any() else None)


def _crush(colour: U8Array, dent: F32Array, rng: np.random.Generator,
           centre: tuple[float, float], damage: Damage) -> None:
    """A dent `size_mm` across (less across the item) and `depth_mm` deep, with creases."""
    th, tw = dent.shape
    ru = max(1.0, damage.size_mm * PX_PER_MM / 2)
    rv = max(1.0, 0.6 * ru)
    cu, cv = centre
    x0, x1 = max(0, int(cu - ru)), min(tw, int(np.ceil(cu + ru)) + 1)
    y0, y1 = max(0, int(cv - rv)), min(th, int(np.ceil(cv + rv)) + 1)
    if x1 <= x0 or y1 <= y0:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    rho2 = ((xx - cu) / ru) ** 2 + ((yy - cv) / rv) ** 2
    bump = np.where(rho2 < 1.0, (1.0 - rho2) ** 2, 0.0).astype(np.float32)
    dent[y0:y1, x0:x1] = bump * np.float32(damage.depth_mm)
    # A shallow dent is a soft shade; a deep crush a dark hollow with creases.
    darkening = float(np.clip(0.9 * damage.depth_mm / (damage.size_mm / 2), 0.05, 0.45))
    roi = colour[y0:y1, x0:x1]
    creased = (roi.astype(np.float32) * (1.0 - darkening * bump)[..., None]).astype(np.uint8)
    creases = {"subtle": 1, "moderate": 2, "severe": 4}[damage.severity]
    for _ in range(creases):
        start = (cu - x0 + rng.normal(0, ru / 4), cv - y0 + rng.normal(0, rv / 4))
        pts = jagged(rng, start, ru, float(rng.uniform(0, 2 * np.pi)), 5)
        cv2.polylines(creased, [fixed(pts)], False, (20, 20, 25),
                      1 if damage.severity == "subtle" else 2, cv2.LINE_AA, 4)
    inside = bump > 0
    roi[inside] = creased[inside]


def _tear(colour: U8Array, dent: F32Array, rng: np.random.Generator,
          centre: tuple[float, float], damage: Damage) -> None:
    """A jagged tear `size_mm` long with the board showing under its lifted flap."""
    size = damage.size_mm * PX_PER_MM
    steps = int(np.clip(size / 6, 3, 10))
    pts = jagged(rng, (centre[0] - size / 2, centre[1]), size, float(rng.uniform(-0.6, 0.6)),
                 steps)
    flap = np.concatenate([pts, pts[::-1] + np.array([0.0, max(1.0, 0.2 * size)])])
    cv2.fillPoly(colour, [fixed(flap)], (120, 160, 190), cv2.LINE_AA, 4)  # exposed board
    width = int(np.clip(round(size / 12), 1, 4))
    cv2.polylines(colour, [fixed(pts)], False, (15, 20, 30), width, cv2.LINE_AA, 4)


def _hole(colour: U8Array, dent: F32Array, rng: np.random.Generator,
          centre: tuple[float, float], damage: Damage) -> None:
    """A hole `size_mm` across with its torn rim; the camera sees `depth_mm` into it."""
    outer = damage.size_mm * PX_PER_MM / 2
    rim = float(np.clip(0.15 * damage.size_mm, 1.0, 4.0)) * PX_PER_MM
    inner = np.array([max(0.5, outer - rim), max(0.5, outer - rim) * 2 / 3])
    angle = float(rng.uniform(0, 180))
    c = fixed_point(centre)
    cv2.ellipse(colour, c, fixed_point(inner + rim), angle, 0, 360,
                (90, 120, 150), -1, cv2.LINE_AA, 4)
    cv2.ellipse(colour, c, fixed_point(inner), angle, 0, 360, (10, 10, 12), -1,
                cv2.LINE_AA, 4)
    cv2.ellipse(dent, c, fixed_point(inner), angle, 0, 360,
                float(damage.depth_mm), -1, cv2.LINE_8, 4)


def _spill(colour: U8Array, dent: F32Array, rng: np.random.Generator,
           centre: tuple[float, float], damage: Damage) -> None:
    """A stain `size_mm` across of liquid that leaked out (severe: also on the belt)."""
    liquid = (30, 50, 85) if rng.random() < 0.5 else (225, 225, 230)
    blot(colour, rng, centre, damage.size_mm * PX_PER_MM / 2, liquid, 0.85, count=8)


def _deconstruction(colour: U8Array, dent: F32Array, rng: np.random.Generator,
                    centre: tuple[float, float], damage: Damage) -> None:
    """The opening the contents push through (the contents are a box the renderer draws)."""
    half = damage.size_mm * PX_PER_MM / 2
    corners = np.array([[centre[0] - half, centre[1] - half], [centre[0] + half, centre[1] - half],
                        [centre[0] + half, centre[1] + half], [centre[0] - half, centre[1] + half]])
    cv2.fillConvexPoly(colour, fixed(corners), (70, 100, 130), cv2.LINE_8, 4)


def contents_box(damage: Damage) -> tuple[float, float]:
    """Footprint (along, across) of the contents standing out of a deconstruction's opening."""
    side = damage.size_mm - 2 * float(np.clip(0.15 * damage.size_mm, 2.0, 6.0))
    return side, 0.6 * side


_DRAW = {DamageType.CRUSH: _crush, DamageType.TEAR: _tear, DamageType.HOLE: _hole,
         DamageType.SPILL: _spill, DamageType.DECONSTRUCTION: _deconstruction}


def contents_colour(seed: int) -> tuple[int, int, int]:
    """Colour of protruding contents: bright, unlike packaging."""
    rng = np.random.default_rng(seed)
    palette = [(0, 200, 255), (255, 80, 0), (0, 255, 120), (230, 0, 230), (255, 255, 0)]
    return palette[int(rng.integers(len(palette)))]


def spill_colour(seed: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(seed)
    return (30, 50, 85) if rng.random() < 0.5 else (225, 225, 230)
