"""What a real line adds to every picture and the models must not take for damage.

Lighting (global gain, colour temperature, a brightness gradient), soft cast shadows, dirt,
scuffs and seams on the belt, motion blur along the belt and patches of missing depth. All
scale with one strength `level` in [0, 1] (`synthetic.nuisance`): 0 draws nothing, 1 is what
the training datasets use. Each draw is a pure function of its generator, so frames stay
deterministic by seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from edge.sim.packaging_art import fixed, fixed_point
from edge.sim.render import CameraRig
from edge.types import BoolArray, F32Array, U8Array

#: Length of the belt loop the dirt is laid out on (mm): it comes round again after this.
BELT_LOOP_MM = 24_000.0
#: Longest exposure at full strength (ms): the belt moves speed x exposure during it.
MAX_EXPOSURE_MS = 4.0
_LIGHT_SCALE = 4


@dataclass(frozen=True, slots=True)
class Lighting:
    """One camera's light at one moment."""

    gain_bgr: tuple[float, float, float]  # global gain times colour temperature
    gradient: tuple[float, float]  # brightness change across the image width and height
    shadows: tuple[tuple[np.ndarray, float], ...]  # (polygon in pixels, darkness 0..1)
    blur_mm: float  # belt travel during the exposure


def draw_lighting(level: float, rng: np.random.Generator, size: tuple[int, int],
                  speed_mm_per_ms: float) -> Lighting:
    """A random lighting state of strength `level` for an image of `size` = (width, height)."""
    w, h = size
    gain = 1.0 + level * rng.uniform(-0.3, 0.25)
    warmth = level * rng.uniform(-0.12, 0.12)  # > 0: warmer (more red, less blue)
    gains = (gain * (1 - warmth), gain, gain * (1 + warmth))
    gradient = (float(level * rng.uniform(-0.35, 0.35)), float(level * rng.uniform(-0.35, 0.35)))
    shadows = []
    for _ in range(int(rng.poisson(1.2 * level))):
        centre = rng.uniform((0, 0), (w, h))
        n = int(rng.integers(3, 7))
        t = np.sort(rng.uniform(0, 2 * np.pi, n))
        r = rng.uniform(0.15, 0.6) * min(w, h) * rng.uniform(0.5, 1.5, n)
        pts = np.stack([centre[0] + r * np.cos(t), centre[1] + r * np.sin(t)], axis=1)
        shadows.append((pts, float(level * rng.uniform(0.15, 0.5))))
    blur = float(speed_mm_per_ms * MAX_EXPOSURE_MS * level * rng.uniform(0, 1))
    return Lighting((float(gains[0]), float(gains[1]), float(gains[2])), gradient,
                    tuple(shadows), blur)


def _light_map(light: Lighting, shape: tuple[int, int]) -> F32Array:
    """Per-pixel, per-channel brightness factor (gains, gradient, shadows). Light varies
    slowly across the image: it is worked out at 1/4 resolution and scaled up."""
    h, w = shape
    sh, sw = max(1, h // _LIGHT_SCALE), max(1, w // _LIGHT_SCALE)
    gx, gy = light.gradient
    fx = 1.0 + gx * ((np.arange(sw, dtype=np.float32) + 0.5) / sw - 0.5)
    fy = 1.0 + gy * ((np.arange(sh, dtype=np.float32) + 0.5) / sh - 0.5)
    factor = np.multiply.outer(fy, fx).astype(np.float32)
    if light.shadows:
        shade = np.zeros((sh, sw), np.float32)
        for pts, darkness in light.shadows:
            cv2.fillPoly(shade, [fixed(pts / _LIGHT_SCALE)], darkness, cv2.LINE_AA, 4)
        factor *= 1.0 - np.asarray(cv2.GaussianBlur(shade, (0, 0), 2.0), dtype=np.float32)
    small = factor[..., None] * np.array(light.gain_bgr, np.float32)
    return np.asarray(cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR),
                      dtype=np.float32)


def _blur_kernel(motion: np.ndarray) -> np.ndarray | None:
    length = float(np.hypot(*motion))
    if length < 1.0 or not np.isfinite(length):
        return None
    half = int(np.ceil(length / 2))
    kernel = np.zeros((2 * half + 1, 2 * half + 1), np.float32)
    d = motion / 2
    cv2.line(kernel, fixed_point((half - d[0], half - d[1])),
             fixed_point((half + d[0], half + d[1])), 1.0, 1, cv2.LINE_AA, 4)
    return np.asarray(kernel / kernel.sum())


def apply_lighting(color: U8Array, damage: BoolArray, light: Lighting, rig: CameraRig
                   ) -> tuple[U8Array, BoolArray]:
    """`color` as the camera sees it under `light`, and the damage mask the blur spread."""
    lit = cv2.multiply(color, _light_map(light, color.shape[:2]), dtype=cv2.CV_8U)
    kernel = _blur_kernel(rig.belt_motion_px(light.blur_mm)) if light.blur_mm > 0 else None
    if kernel is None:
        return np.asarray(lit), damage
    lit = cv2.filter2D(lit, -1, kernel, borderType=cv2.BORDER_REPLICATE)
    if damage.any():
        damage = cv2.dilate(damage.astype(np.uint8), (kernel > 0).astype(np.uint8)) > 0
    return np.asarray(lit), damage


def drop_depth_patches(depth: np.ndarray, level: float, rng: np.random.Generator) -> None:
    """Blotches of missing depth (glare, texture-less spots) punched into `depth` in place."""
    h, w = depth.shape
    for _ in range(int(rng.poisson(3.0 * level))):
        centre = (int(rng.uniform(0, w)), int(rng.uniform(0, h)))
        axes = (int(rng.uniform(3, 25)), int(rng.uniform(3, 25)))
        cv2.ellipse(depth, centre, axes, float(rng.uniform(0, 180)), 0, 360, 0, -1)


@dataclass(frozen=True, slots=True)
class _Decal:
    x_mm: float  # on the belt loop
    outline: np.ndarray  # belt-frame x, y (mm) relative to x_mm
    colour: tuple[int, int, int]
    reach_mm: float  # half its extent along the belt


class BeltDirt:
    """Stains, scuffs and seams on the belt; they ride along with it."""

    def __init__(self, level: float, seed: int, belt_width_mm: float) -> None:
        rng = np.random.default_rng([seed, 0xD1E7])
        half = belt_width_mm / 2
        decals = []
        for _ in range(int(level * 160)):
            x = float(rng.uniform(0, BELT_LOOP_MM))
            y = float(rng.uniform(-half, half))
            kind = rng.random()
            if kind < 0.5:  # stain
                n = 12
                t = np.linspace(0, 2 * np.pi, n, endpoint=False)
                r = rng.uniform(10, 80) * rng.uniform(0.6, 1.4, n)
                outline = np.stack([r * np.cos(t), y + 0.7 * r * np.sin(t)], axis=1)
                tone = int(rng.integers(36, 52))
                colour = (tone, tone + int(rng.integers(0, 6)), tone + int(rng.integers(0, 12)))
            elif kind < 0.85:  # scuff: a light streak, mostly along the belt
                length, width = rng.uniform(40, 300), rng.uniform(2, 10)
                a = rng.normal(0, 0.3)
                along = np.array([np.cos(a), np.sin(a)]) * length / 2
                across = np.array([-np.sin(a), np.cos(a)]) * width / 2
                outline = np.array([-along - across, along - across, along + across,
                                    -along + across])
                outline[:, 1] += y
                tone = int(rng.integers(72, 105))
                colour = (tone, tone, tone)
            else:  # seam: a splice straight across the belt
                width = rng.uniform(3, 8)
                outline = np.array([[-width / 2, -half], [width / 2, -half], [width / 2, half],
                                    [-width / 2, half]])
                colour = (30, 31, 33) if rng.random() < 0.6 else (95, 95, 92)
            outline[:, 1] = np.clip(outline[:, 1], -half, half)
            decals.append(_Decal(x, outline, colour, float(np.abs(outline[:, 0]).max())))
        self._decals = decals

    def draw(self, rig: CameraRig, color: U8Array, travel_mm: float) -> None:
        """Draw the decals in view once the belt has moved `travel_mm`."""
        lo, hi = rig.view_x_mm
        for d in self._decals:
            x = (d.x_mm + travel_mm - lo) % BELT_LOOP_MM + lo
            if x - d.reach_mm > hi:
                continue
            pts = np.column_stack([d.outline[:, 0] + x, d.outline[:, 1],
                                   np.zeros(len(d.outline))])
            px = rig.plane.project(pts)
            if np.isnan(px).any():
                continue
            cv2.fillPoly(color, [fixed(px)], d.colour, cv2.LINE_AA, 4)
