"""The synthetic conveyor's scene: which items ride the belt, when, and what is wrong with them.

Everything is a pure function of the seed: the item schedule is drawn
sequentially from one generator and extended lazily, so any frame of any
camera can be rendered in any order and gives the same bytes.
"""

from __future__ import annotations

import bisect
import math
import threading
from dataclasses import dataclass
from typing import Literal

import numpy as np

from edge.catalogue import Catalogue, Product
from edge.config import BeltConfig, ConfigError, SyntheticConfig
from edge.types import Announcement, DamageType, ItemTruth

#: Gap left between items that are not meant to touch (mm).
MIN_GAP_MM = 60.0
#: How much of the schedule is drawn at a time.
_CHUNK = 64


#: How bad a damage is, in physical units per type (`ItemSchedule` draws them, `DAMAGE_RANGES`).
Severity = Literal["subtle", "moderate", "severe"]
SEVERITIES: tuple[Severity, ...] = ("subtle", "moderate", "severe")


@dataclass(frozen=True, slots=True)
class Damage:
    """Where and how an item is damaged, in item-local millimetres (top face, centre origin).

    `size_mm` and `depth_mm` are what the renderer draws, per type: crush: the dent's
    diameter along the item and its depth; tear: its length and how far the flap lifts; hole:
    its diameter across (with the torn rim) and how deep the camera sees into it; spill: the
    stain's diameter (0 deep); deconstruction: the opening's side and how far the contents
    stand out of it; broken set: the missing unit's length and height.
    """

    type: DamageType
    u_mm: float  # along the item's length
    v_mm: float  # across
    size_mm: float
    depth_mm: float
    seed: int
    missing_unit: int = -1  # broken set: index of the missing unit
    severity: Severity = "severe"


#: Subtle and moderate damage per type: ((size range), (depth range)) in mm; a depth of None
#: is drawn from the item's height. Severe damage is the original extremes (`_severe`).
DAMAGE_RANGES: dict[DamageType, dict[Severity, tuple[tuple[float, float],
                                                     tuple[float, float] | None]]] = {
    DamageType.CRUSH: {"subtle": ((20.0, 60.0), (3.0, 10.0)),
                       "moderate": ((40.0, 100.0), (10.0, 25.0))},
    DamageType.TEAR: {"subtle": ((10.0, 30.0), (1.0, 3.0)),
                      "moderate": ((30.0, 60.0), (2.0, 5.0))},
    DamageType.HOLE: {"subtle": ((4.0, 10.0), None), "moderate": ((10.0, 25.0), None)},
    DamageType.SPILL: {"subtle": ((10.0, 30.0), (0.0, 0.0)),
                       "moderate": ((30.0, 70.0), (0.0, 0.0))},
    DamageType.DECONSTRUCTION: {"subtle": ((20.0, 40.0), (5.0, 12.0)),
                                "moderate": ((40.0, 70.0), (12.0, 25.0))},
}
#: A dent never goes deeper than this share of the item's height.
MAX_DENT_SHARE = 0.6
#: Damage keeps this share of its top face's shorter side (multipacks: one unit's top).
MAX_SIZE_SHARE = 0.8


def top_faces(product: Product, dims: tuple[float, float, float]
              ) -> list[tuple[int, float, float, float, float]]:
    """(unit index, centre u, centre v, length, width) of each unit's top; one for single items."""
    length, width, _ = dims
    along, across = product.unit_grid
    ul, uw = length / along, width / across
    return [(i * across + j, (i + 0.5) * ul - length / 2, (j + 0.5) * uw - width / 2, ul, uw)
            for i in range(along) for j in range(across)]


@dataclass(frozen=True, slots=True)
class SceneItem:
    """One item on the belt with its ground truth and how to draw it."""

    index: int
    item_id: str
    product: Product
    induct_ms: float  # relative to the world's start
    y_mm: float  # lateral position of the centre
    yaw_rad: float
    dims_mm: tuple[float, float, float]
    damage: Damage | None
    touching_previous: bool

    @property
    def truth(self) -> ItemTruth:
        dmg = self.damage
        return ItemTruth(
            item_id=self.item_id,
            product_id=self.product.product_id,
            damage=dmg.type if dmg else None,
            box_mm=self.dims_mm,
            confounder=self.product.damage_like_print,
            severity=dmg.severity if dmg else None,
            damage_size_mm=dmg.size_mm if dmg else None,
            damage_depth_mm=dmg.depth_mm if dmg else None,
            print_style=self.product.artwork if self.product.damage_like_print else None,
        )

    def x_mm(self, t_ms: float, speed_mm_per_ms: float, induct_x_mm: float) -> float:
        return induct_x_mm + (t_ms - self.induct_ms) * speed_mm_per_ms

    def extent_x_mm(self) -> float:
        """Half the footprint's extent along the belt (accounts for yaw)."""
        length, width, _ = self.dims_mm
        return 0.5 * (abs(math.cos(self.yaw_rad)) * length + abs(math.sin(self.yaw_rad)) * width)


class ItemSchedule:
    """The lazily drawn, deterministic stream of items inducted onto the belt."""

    def __init__(self, cfg: SyntheticConfig, belt: BeltConfig, catalogue: Catalogue) -> None:
        self._cfg = cfg
        self._belt = belt
        self._rng = np.random.default_rng([cfg.seed, 0x5EED])
        self._items: list[SceneItem] = []
        self._times: list[float] = []  # induct time of each item, for bisection
        self._lock = threading.Lock()
        self._severity_p = _severity_shares(cfg.severity_mix)
        self._plain = tuple(p for p in catalogue.products if not p.damage_like_print)
        self._confounders = tuple(p for p in catalogue.products if p.damage_like_print)
        self.speed_mm_per_ms = belt.speed_mps  # m/s == mm/ms
        self._next_free_ms = 0.0

    def items_until(self, t_ms: float) -> list[SceneItem]:
        """All items inducted up to `t_ms` (relative to the world start)."""
        if self._cfg.items_per_second <= 0:
            return []
        with self._lock:
            while not self._items or self._items[-1].induct_ms < t_ms:
                self._extend()
            return self._items[:bisect.bisect_right(self._times, t_ms)]

    def item(self, index: int) -> SceneItem:
        """The `index`-th item inducted (drawing the schedule that far)."""
        with self._lock:
            while len(self._items) <= index:
                self._extend()
            return self._items[index]

    def _extend(self) -> None:
        for _ in range(_CHUNK):
            item = self._draw(len(self._items))
            self._items.append(item)
            self._times.append(item.induct_ms)

    def _pick_product(self) -> Product:
        rng = self._rng
        pool = self._plain
        if self._confounders and (rng.random() < self._cfg.confounder_rate or not pool):
            pool = self._confounders
        return pool[int(rng.integers(len(pool)))]

    def _draw(self, index: int) -> SceneItem:
        rng = self._rng
        product = self._pick_product()
        length, width, height = product.dims_mm
        # Packaging tolerances: boxes are accurate, bags are not.
        slack = {"box": 0.01, "mailer": 0.02, "polybag": 0.05, "multipack": 0.01}[product.packaging]
        dims = (length * (1 + rng.normal(0, slack)), width * (1 + rng.normal(0, slack)),
                height * (1 + rng.normal(0, slack)))
        yaw = float(rng.uniform(-0.25, 0.25))
        touching = index > 0 and rng.random() < self._cfg.touching_rate
        margin = 0.5 * self._belt.width_mm - 0.5 * (abs(np.sin(yaw)) * dims[0] +
                                                   abs(np.cos(yaw)) * dims[1]) - 25.0
        y = float(rng.uniform(-max(0.0, margin), max(0.0, margin)))
        damage = self._draw_damage(product, dims, rng)
        half_x = 0.5 * (abs(np.cos(yaw)) * dims[0] + abs(np.sin(yaw)) * dims[1])
        v = self.speed_mm_per_ms
        mean_gap_ms = 1000.0 / self._cfg.items_per_second
        if index == 0:
            induct = float(rng.uniform(0.0, mean_gap_ms))
        elif touching:
            prev = self._items[-1]
            induct = prev.induct_ms + (prev.extent_x_mm() + half_x) / v
            y = prev.y_mm + float(rng.uniform(-30, 30))
            yaw = prev.yaw_rad
        else:
            prev = self._items[-1]
            earliest = prev.induct_ms + (prev.extent_x_mm() + half_x + MIN_GAP_MM) / v
            induct = max(earliest, prev.induct_ms + float(rng.exponential(mean_gap_ms)))
        return SceneItem(
            index=index,
            item_id=f"SYN{self._cfg.seed:04d}-{index:06d}",
            product=product,
            induct_ms=induct,
            y_mm=y,
            yaw_rad=yaw,
            dims_mm=dims,
            damage=damage,
            touching_previous=touching,
        )

    def _draw_damage(self, product: Product, dims: tuple[float, float, float],
                     rng: np.random.Generator) -> Damage | None:
        if rng.random() >= self._cfg.damage_rate:
            return None
        kinds = [DamageType.CRUSH, DamageType.TEAR, DamageType.HOLE, DamageType.SPILL,
                 DamageType.DECONSTRUCTION]
        if product.units > 1:
            kinds = [*kinds, DamageType.BROKEN_SET, DamageType.BROKEN_SET]
        kind = kinds[int(rng.integers(len(kinds)))]
        length, width, height = dims
        # Every kind makes the same draws (a broken set's missing unit aside), so the items
        # after this one do not depend on which damage it got; grades below severe redraw
        # from the damage's own seed.
        size = float(rng.uniform(0.25, 0.45) * min(length, width))
        u = float(rng.uniform(-0.3, 0.3) * length)
        v = float(rng.uniform(-0.3, 0.3) * width)
        depths = {
            DamageType.CRUSH: rng.uniform(0.25, 0.5) * height,
            DamageType.HOLE: rng.uniform(0.3, 0.6) * height,
            DamageType.TEAR: rng.uniform(3.0, 8.0),
            DamageType.SPILL: 0.0,
            DamageType.DECONSTRUCTION: rng.uniform(25.0, 50.0),
            DamageType.BROKEN_SET: height,
        }
        missing = int(rng.integers(product.units)) if kind is DamageType.BROKEN_SET else -1
        seed = int(rng.integers(2**31))
        severity: Severity = "severe"
        if kind is not DamageType.BROKEN_SET and np.count_nonzero(self._severity_p) > 1:
            severity = SEVERITIES[int(rng.choice(3, p=self._severity_p))]
        elif kind is not DamageType.BROKEN_SET:
            severity = SEVERITIES[int(np.argmax(self._severity_p))]
        if severity == "severe":
            return _severe(kind, product, dims, size, (u, v), float(depths[kind]), seed, missing)
        return _graded(kind, severity, product, dims, seed)

    def announcements_until(self, t_ms: float, start_ms: float, skip: int = 0
                            ) -> list[Announcement]:
        """The controller's induct events up to `t_ms` (relative), stamped on the wall clock;
        `skip` leaves out the first ones (already sent)."""
        return [
            Announcement(item_id=it.item_id, product_id=it.product.product_id,
                         induct_time_ms=start_ms + it.induct_ms)
            for it in self.items_until(t_ms)[skip:]
        ]


def _severity_shares(mix: tuple[float, ...]) -> np.ndarray:
    """Probabilities of subtle, moderate, severe from `synthetic.severity_mix`."""
    shares = np.array(mix, dtype=np.float64)
    if shares.shape != (3,) or not np.isfinite(shares).all() or (shares < 0).any() \
            or shares.sum() <= 0:
        raise ConfigError("synthetic.severity_mix", list(mix),
                          "three shares >= 0 (subtle, moderate, severe), not all 0")
    return np.asarray(shares / shares.sum())


def _fit_size(product: Product, dims: tuple[float, float, float], size: float
              ) -> tuple[float, tuple[int, float, float, float, float]]:
    """`size` capped to what the first unit's top holds (multipacks), with that top."""
    face = top_faces(product, dims)[0]
    if product.units <= 1:
        return size, face
    return min(size, MAX_SIZE_SHARE * min(face[3], face[4])), face


def _severe(kind: DamageType, product: Product, dims: tuple[float, float, float], size: float,
            at: tuple[float, float], depth: float, seed: int, missing: int) -> Damage:
    """The original extremes, in physical units (see `Damage`)."""
    length, width, height = dims
    u, v = at
    if kind is DamageType.BROKEN_SET:
        _, cu, cv, ul, _ = top_faces(product, dims)[missing]
        return Damage(kind, cu, cv, ul, height, seed, missing)
    size, face = _fit_size(product, dims, size)
    if product.units > 1:  # on the first unit, in its middle
        u, v = face[1], face[2]
    if kind is DamageType.HOLE:
        size = 0.5 * size + 8.0  # the hole and its torn rim
    elif kind is DamageType.DECONSTRUCTION:
        size, depth = 0.7 * size + 12.0, depth - 5.0  # the opening; contents above the top
    elif kind is DamageType.SPILL and product.units <= 1:
        # The stain ran half-way to the edge on its side, and stays on the top.
        edge = 0.5 * width if v >= 0 else -0.5 * width
        v = float(np.clip((v + edge) / 2, -(width - size) / 2, (width - size) / 2))
        u = float(np.clip(u, -(length - size) / 2, (length - size) / 2))
    return Damage(kind, u, v, float(size), float(depth), seed)


def _graded(kind: DamageType, severity: Severity, product: Product,
            dims: tuple[float, float, float], seed: int) -> Damage:
    """Subtle or moderate damage of `kind`, drawn from `DAMAGE_RANGES` (own generator)."""
    rng = np.random.default_rng([seed, 0x5E7])
    height = dims[2]
    (size_lo, size_hi), depth_range = DAMAGE_RANGES[kind][severity]
    faces = top_faces(product, dims)
    _, cu, cv, fl, fw = faces[int(rng.integers(len(faces)))]
    size = min(float(rng.uniform(size_lo, size_hi)), MAX_SIZE_SHARE * min(fl, fw))
    if depth_range is None:
        depth = float(rng.uniform(0.3, 0.6) * height)
    elif kind is DamageType.CRUSH:
        # Below severe, which starts at a quarter of the height; never deeper than it can be.
        lo, hi = depth_range
        if severity == "moderate":
            hi = max(lo + 2.0, min(hi, 0.25 * height))
        depth = min(float(rng.uniform(lo, hi)), MAX_DENT_SHARE * height)
    else:
        depth = float(rng.uniform(*depth_range))
    # Anywhere on the top that holds it whole.
    du = max(0.0, (fl - size) / 2 - 3.0)
    dv = max(0.0, (fw - size) / 2 - 3.0)
    u = cu + float(rng.uniform(-du, du))
    v = cv + float(rng.uniform(-dv, dv))
    return Damage(kind, u, v, size, depth, seed, severity=severity)
