"""Procedural packaging looks: materials, logos, printed text, bands, tape, labels, and the
damage-like prints of confounder products.

Everything is drawn in item-top texture space (1 px per mm, x along the item's length) from
the product's `art_seed`, so a product always looks the same and two products of different
seeds do not. A product's top is drawn once at its nominal size and resized to each item.
"""

from __future__ import annotations

import functools
import string

import cv2
import numpy as np

from edge.catalogue import Product
from edge.types import U8Array

_FONTS = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX,
          cv2.FONT_HERSHEY_TRIPLEX, cv2.FONT_HERSHEY_PLAIN, cv2.FONT_HERSHEY_SCRIPT_SIMPLEX,
          cv2.FONT_HERSHEY_COMPLEX_SMALL)
_LETTERS = string.ascii_uppercase + string.digits
_WORDS = ("FRAGILE", "THIS SIDE UP", "HANDLE WITH CARE", "KEEP DRY", "EXPRESS", "PRIORITY",
          "RECYCLE", "ORGANIC", "NEW", "ECO", "PREMIUM", "FRESH", "SHIP")
#: Packaging whose top is corrugated board.
_BOARD = ("box", "multipack")
_FIBRE_TILE = 256


@functools.lru_cache(maxsize=1)
def _fibre_tile() -> np.ndarray:
    """Paper fibre and corrugation noise, tiled under board and kraft tops (int16, ~unit std)."""
    rng = np.random.default_rng(0xF1B4E)
    noise = rng.normal(0, 1, (_FIBRE_TILE, _FIBRE_TILE)).astype(np.float32)
    fibre = cv2.GaussianBlur(noise, (9, 1), 0) * 2.0 + noise * 0.5  # streaks along x
    return np.asarray(fibre / fibre.std(), dtype=np.float32)


def _text(rng: np.random.Generator) -> str:
    if rng.random() < 0.4:
        return str(_WORDS[int(rng.integers(len(_WORDS)))])
    n = int(rng.integers(3, 11))
    return "".join(_LETTERS[int(k)] for k in rng.integers(len(_LETTERS), size=n))


def _ink(rng: np.random.Generator, base: np.ndarray) -> tuple[int, int, int]:
    """A print colour that stands out from `base`: dark, bright or its complement."""
    pick = rng.random()
    if pick < 0.4:
        c = rng.integers(0, 70, 3)
    elif pick < 0.75:
        c = rng.integers(0, 256, 3)
        c[int(rng.integers(3))] = int(rng.integers(180, 256))
    else:
        c = 255 - base.astype(np.int64)
    return (int(c[0]), int(c[1]), int(c[2]))


def put_text(img: U8Array, rng: np.random.Generator, box: tuple[int, int, int, int],
             colour: tuple[int, int, int], text: str | None = None) -> None:
    """One line of random text scaled to fit `box` = (x, y, width, height)."""
    x, y, w, h = box
    if w < 8 or h < 4:
        return
    font = _FONTS[int(rng.integers(len(_FONTS)))]
    thickness = int(rng.integers(1, 4))
    text = text or _text(rng)
    (tw, th), _ = cv2.getTextSize(text, font, 1.0, thickness)
    scale = min(w / max(tw, 1), h / max(th, 1))
    if scale * th < 3:
        return
    cv2.putText(img, text, (x, y + int(th * scale)), font, scale, colour, thickness,
                lineType=cv2.LINE_AA)


def _logo(img: U8Array, rng: np.random.Generator, centre: tuple[float, float], r: float,
          colour: tuple[int, int, int]) -> None:
    kind = int(rng.integers(5))
    cx, cy = centre
    if kind == 0:
        cv2.circle(img, (int(cx), int(cy)), max(2, int(r)), colour, -1, cv2.LINE_AA)
    elif kind == 1:
        cv2.circle(img, (int(cx), int(cy)), max(2, int(r)), colour, max(2, int(r / 4)),
                   cv2.LINE_AA)
    elif kind == 2:  # star or polygon
        n = int(rng.integers(3, 9))
        inner = rng.uniform(0.4, 1.0)
        t = np.linspace(0, 2 * np.pi, 2 * n, endpoint=False) + rng.uniform(0, np.pi)
        rad = np.where(np.arange(2 * n) % 2 == 0, r, r * inner)
        pts = np.stack([cx + rad * np.cos(t), cy + rad * np.sin(t)], axis=1)
        cv2.fillPoly(img, [np.round(pts).astype(np.int32)], colour, cv2.LINE_AA)
    elif kind == 3:
        cv2.rectangle(img, (int(cx - r), int(cy - 0.6 * r)), (int(cx + r), int(cy + 0.6 * r)),
                      colour, -1)
    else:  # a letter mark
        put_text(img, rng, (int(cx - r), int(cy - r), int(2 * r), int(2 * r)), colour,
                 _LETTERS[int(rng.integers(26))])


def _material(img: U8Array, product: Product, rng: np.random.Generator) -> None:
    """Board, paper or film: fibre noise and flutes, or wrinkles and shine."""
    th, tw = img.shape[:2]
    base = np.asarray(product.colour_bgr, dtype=np.float32)
    if product.packaging == "polybag" or (product.packaging == "mailer" and rng.random() < 0.5):
        for _ in range(int(rng.integers(4, 12))):  # film: wrinkles and highlights
            y = float(rng.uniform(0, th))
            lift = float(rng.uniform(15, 45))
            colour = tuple(int(min(255.0, c + lift)) for c in base)
            cv2.line(img, (0, int(y)), (tw, int(y + rng.normal(0, 0.2 * th))), colour,
                     int(rng.integers(1, 5)), cv2.LINE_AA)
        return
    tile = _fibre_tile()
    reps = (th // _FIBRE_TILE + 1, tw // _FIBRE_TILE + 1)
    oy, ox = (int(v) for v in rng.integers(0, _FIBRE_TILE, 2))
    noise = np.roll(np.tile(tile, reps), (-oy, -ox), axis=(0, 1))[:th, :tw]
    amplitude = float(rng.uniform(3.0, 7.0))
    if product.packaging in _BOARD:
        # Corrugation flutes show faintly through the liner.
        period = float(rng.uniform(6.0, 9.0))
        axis = np.arange(th if rng.random() < 0.5 else tw, dtype=np.float32)
        flutes = 1.5 * np.sin(2 * np.pi * axis / period)
        noise = noise * amplitude + (flutes[:, None] if axis.size == th else flutes[None, :])
    else:
        noise = noise * amplitude
    out = img.astype(np.float32) + noise[..., None]
    np.clip(out, 0, 255, out=out)
    img[:] = out.astype(np.uint8)


def _band(img: U8Array, rng: np.random.Generator, base: np.ndarray) -> None:
    th, tw = img.shape[:2]
    colour = _ink(rng, base)
    if rng.random() < 0.5:
        y0 = int(rng.uniform(0, 0.8) * th)
        cv2.rectangle(img, (0, y0), (tw, y0 + int(rng.uniform(0.05, 0.2) * th)), colour, -1)
    else:
        x0 = int(rng.uniform(0, 0.8) * tw)
        cv2.rectangle(img, (x0, 0), (x0 + int(rng.uniform(0.05, 0.2) * tw), th), colour, -1)


def _pattern(img: U8Array, rng: np.random.Generator, base: np.ndarray) -> None:
    """An all-over print: diagonal stripes or dots."""
    th, tw = img.shape[:2]
    colour = _ink(rng, base)
    step = int(rng.integers(12, 40))
    if rng.random() < 0.5:
        for k in range(-th, tw, step):
            cv2.line(img, (k, 0), (k + th, th), colour, max(1, step // 4), cv2.LINE_AA)
    else:
        r = max(1, step // 5)
        for y in range(step // 2, th, step):
            for x in range(step // 2, tw, step):
                cv2.circle(img, (x, y), r, colour, -1, cv2.LINE_AA)


def _tape(img: U8Array, rng: np.random.Generator) -> None:
    """Packing tape along the length over the seam: clear brown, or printed."""
    th, tw = img.shape[:2]
    width = int(rng.uniform(40.0, 75.0))
    if width >= 0.6 * th:
        return
    y0 = int(th / 2 - width / 2 + rng.normal(0, 3))
    strip = img[max(0, y0):y0 + width]
    if rng.random() < 0.65:
        tint = np.array([60, 115, 175], np.float32)
        mixed = 0.6 * strip.astype(np.float32) + 0.4 * tint + rng.uniform(5, 20)
        strip[:] = np.clip(mixed, 0, 255).astype(np.uint8)
        glint = max(0, y0) + int(rng.uniform(0.2, 0.8) * width)
        cv2.line(img, (0, glint), (tw, glint), (235, 235, 235), 1, cv2.LINE_AA)
    else:
        strip[:] = (235, 235, 235) if rng.random() < 0.5 else _ink(rng, strip[0, 0])
        text = _text(rng)
        for x in range(5, tw, max(40, width * 3)):
            put_text(img, rng, (x, max(0, y0) + width // 4, width * 2, width // 2),
                     (30, 30, 200), text)


def label(img: U8Array, rng: np.random.Generator, size_mm: tuple[float, float] = (100, 70)
          ) -> None:
    """A white label with a barcode and a few lines of text, somewhere on the top."""
    th, tw = img.shape[:2]
    lw, lh = size_mm
    if rng.random() < 0.5:
        lw, lh = lh, lw
    scale = min(1.0, 0.5 * tw / lw, 0.5 * th / lh)
    lw, lh = int(lw * scale), int(lh * scale)
    if lw < 20 or lh < 14:
        return
    x0 = int(rng.uniform(0, tw - lw))
    y0 = int(rng.uniform(0, th - lh))
    white = int(rng.integers(225, 252))
    cv2.rectangle(img, (x0, y0), (x0 + lw, y0 + lh), (white, white, white), -1)
    # Barcode: bars of random widths across the lower part.
    bar_top, bar_bottom = y0 + int(0.55 * lh), y0 + int(0.9 * lh)
    x = x0 + 3
    while x < x0 + lw - 4:
        w = int(rng.integers(1, 4))
        if rng.random() < 0.55:
            cv2.rectangle(img, (x, bar_top), (x + w - 1, bar_bottom), (15, 15, 15), -1)
        x += w
    lines = int(rng.integers(1, 4))
    for k in range(lines):
        row = y0 + 2 + int(k * 0.5 * lh / lines)
        put_text(img, rng, (x0 + 3, row, int(lw * rng.uniform(0.4, 0.9)),
                            max(3, int(0.4 * lh / lines))), (20, 20, 20))


def jagged(rng: np.random.Generator, start: tuple[float, float], length: float, angle: float,
           steps: int, wander: float = 0.5) -> np.ndarray:
    """A jagged path of `steps` segments, `length` long in all (float pixel coordinates)."""
    pts = [np.array(start, dtype=np.float64)]
    for _ in range(steps):
        angle += rng.normal(0, wander)
        pts.append(pts[-1] + length / steps * np.array([np.cos(angle), np.sin(angle)]))
    return np.array(pts)


def fixed(pts: np.ndarray) -> np.ndarray:
    """Float pixel coordinates as OpenCV's 4-bit fixed point (draw with shift=4)."""
    return np.round(np.asarray(pts) * 16).astype(np.int32)


def fixed_point(xy: tuple[float, float] | np.ndarray) -> tuple[int, int]:
    """One point (or a pair of axes) in 4-bit fixed point, for OpenCV's circle and ellipse."""
    return (round(float(xy[0]) * 16), round(float(xy[1]) * 16))


def blot(img: U8Array, rng: np.random.Generator, centre: tuple[float, float], radius: float,
         colour: tuple[int, int, int], opacity: float, count: int = 7) -> None:
    """An irregular blot that stays within `radius` of `centre`."""
    layer = img.copy()
    for _ in range(count):
        r = float(rng.uniform(0.3, 0.55)) * radius
        reach = max(0.0, radius - r)
        t, d = rng.uniform(0, 2 * np.pi), rng.uniform(0, reach)
        c = (centre[0] + d * np.cos(t), centre[1] + d * np.sin(t))
        cv2.circle(layer, fixed_point(c), round(r * 16),
                   colour, -1, cv2.LINE_AA, shift=4)
    cv2.addWeighted(layer, opacity, img, 1.0 - opacity, 0.0, dst=img)


def damage_print(img: U8Array, style: str, rng: np.random.Generator) -> None:
    """A picture of damage printed on intact packaging (the confounders)."""
    th, tw = img.shape[:2]
    short = min(tw, th)
    spots = int(rng.integers(1, 4))
    for _ in range(spots):
        centre = (float(rng.uniform(0.2, 0.8) * tw), float(rng.uniform(0.2, 0.8) * th))
        size = float(rng.uniform(0.12, 0.4) * short)
        if style == "crack_print":
            for _ in range(int(rng.integers(2, 5))):
                pts = jagged(rng, centre, size, float(rng.uniform(0, 2 * np.pi)), 8, 0.6)
                cv2.polylines(img, [fixed(pts)], False, _ink(rng, np.zeros(3)) if rng.random()
                              < 0.2 else (25, 32, 42), int(rng.integers(1, 4)), cv2.LINE_AA, 4)
        elif style == "stain_print":
            tone = rng.uniform(0.3, 0.7)
            colour = (int(40 * tone + 20), int(60 * tone + 30), int(90 * tone + 40))
            blot(img, rng, centre, size / 2, colour, float(rng.uniform(0.5, 0.9)))
        elif style == "hole_print":
            axes = np.array([size / 2, size / 2 * rng.uniform(0.5, 1.0)])
            angle = float(rng.uniform(0, 180))
            c = fixed_point(centre)
            rim = max(1.0, 0.15 * size)
            cv2.ellipse(img, c, fixed_point(axes + rim), angle, 0, 360,
                        (90, 120, 150), -1, cv2.LINE_AA, 4)
            cv2.ellipse(img, c, fixed_point(axes), angle, 0, 360,
                        (12, 12, 14), -1, cv2.LINE_AA, 4)
        elif style == "tear_print":
            pts = jagged(rng, (centre[0] - size / 2, centre[1]), size,
                         float(rng.uniform(-0.6, 0.6)), 10)
            flap = np.concatenate([pts, pts[::-1] + np.array([0.0, 0.2 * size])])
            cv2.fillPoly(img, [fixed(flap)], (120, 160, 190), cv2.LINE_AA, 4)
            cv2.polylines(img, [fixed(pts)], False, (15, 20, 30), 3, cv2.LINE_AA, 4)
            for _ in range(int(rng.integers(1, 4))):  # printed creases beside it
                crease = jagged(rng, centre, 0.6 * size, float(rng.uniform(0, 2 * np.pi)), 4)
                cv2.polylines(img, [fixed(crease)], False, (40, 45, 55), 1, cv2.LINE_AA, 4)
        elif style == "splash_print":
            colour = _ink(rng, np.zeros(3)) if rng.random() < 0.6 else (30, 50, 85)
            blot(img, rng, centre, size / 3, colour, 1.0, count=5)
            for _ in range(int(rng.integers(6, 16))):  # droplets and streaks flung out
                t = rng.uniform(0, 2 * np.pi)
                d = rng.uniform(0.4, 1.0) * size
                end = (centre[0] + d * np.cos(t), centre[1] + d * np.sin(t))
                cv2.line(img, fixed_point(centre),
                         fixed_point(end), colour,
                         int(rng.integers(1, 4)), cv2.LINE_AA, 4)
                cv2.circle(img, fixed_point(end),
                           int(16 * rng.uniform(1.5, 5.0)), colour, -1, cv2.LINE_AA, 4)
        else:
            raise ValueError(f"unknown print style {style!r}")


@functools.lru_cache(maxsize=96)
def _nominal_top(product: Product, unit: bool) -> U8Array:
    """The product's top at its nominal size (one unit's for multipack units)."""
    assert product.art_seed is not None
    length, width, _ = product.dims_mm
    if unit:
        along, across = product.unit_grid
        length, width = length / along, width / across
    tw, th = max(8, round(length)), max(8, round(width))
    rng = np.random.default_rng([product.art_seed, int(unit)])
    base = np.array(product.colour_bgr, dtype=np.uint8)
    img = np.empty((th, tw, 3), dtype=np.uint8)
    img[:] = base
    _material(img, product, rng)
    if product.artwork != "plain":  # brand artwork; confounders are branded products too
        if rng.random() < 0.15:
            _pattern(img, rng, base)
        if rng.random() < 0.4:
            _band(img, rng, base)
        for _ in range(int(rng.integers(1, 3))):
            r = float(rng.uniform(0.08, 0.22) * min(tw, th))
            _logo(img, rng, (float(rng.uniform(r, tw - r)), float(rng.uniform(r, th - r))), r,
                  _ink(rng, base))
        for _ in range(int(rng.integers(1, 5))):
            x, y = int(rng.uniform(0, 0.5) * tw), int(rng.uniform(0, 0.85) * th)
            put_text(img, rng, (x, y, int(rng.uniform(0.3, 0.9) * (tw - x)),
                                int(rng.uniform(0.04, 0.15) * th)), _ink(rng, base))
    elif rng.random() < 0.4:  # a handling mark on plain packaging
        put_text(img, rng, (int(0.1 * tw), int(0.1 * th), int(0.5 * tw), int(0.1 * th)),
                 (30, 30, 30), str(_WORDS[int(rng.integers(3))]))
    if product.packaging in _BOARD and rng.random() < 0.7:
        _tape(img, rng)
    if rng.random() < 0.25:
        label(img, rng, (60.0, 40.0))
    if product.damage_like_print:
        damage_print(img, product.artwork, rng)
    img.setflags(write=False)  # shared by every item of the product
    return img


def procedural_top(product: Product, dims_mm: tuple[float, float, float], *,
                   unit: bool = False) -> U8Array:
    """The printed top of an intact item (or multipack unit) of an `art_seed` product, at
    `dims_mm` (the item's own, slightly off nominal)."""
    nominal = _nominal_top(product, unit)
    tw, th = max(8, int(dims_mm[0])), max(8, int(dims_mm[1]))
    return np.asarray(cv2.resize(nominal, (tw, th), interpolation=cv2.INTER_LINEAR))
