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

import numpy as np

from edge.catalogue import Catalogue, Product
from edge.config import BeltConfig, SyntheticConfig
from edge.types import Announcement, DamageType, ItemTruth

#: Gap left between items that are not meant to touch (mm).
MIN_GAP_MM = 60.0
#: How much of the schedule is drawn at a time.
_CHUNK = 64


@dataclass(frozen=True, slots=True)
class Damage:
    """Where and how an item is damaged, in item-local millimetres (top face, centre origin)."""

    type: DamageType
    u_mm: float  # along the item's length
    v_mm: float  # across
    size_mm: float
    depth_mm: float  # dent/hole depth, protrusion height
    seed: int
    missing_unit: int = -1  # broken set: index of the missing unit


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
        return ItemTruth(
            item_id=self.item_id,
            product_id=self.product.product_id,
            damage=self.damage.type if self.damage else None,
            box_mm=self.dims_mm,
            confounder=self.product.damage_like_print,
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
                for _ in range(_CHUNK):
                    item = self._draw(len(self._items))
                    self._items.append(item)
                    self._times.append(item.induct_ms)
            return self._items[:bisect.bisect_right(self._times, t_ms)]

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
        size = float(rng.uniform(0.25, 0.45) * min(length, width))
        u = float(rng.uniform(-0.3, 0.3) * length)
        v = float(rng.uniform(-0.3, 0.3) * width)
        depth = {
            DamageType.CRUSH: rng.uniform(0.25, 0.5) * height,
            DamageType.HOLE: rng.uniform(0.3, 0.6) * height,
            DamageType.TEAR: rng.uniform(3.0, 8.0),
            DamageType.SPILL: 0.0,
            DamageType.DECONSTRUCTION: rng.uniform(25.0, 50.0),
            DamageType.BROKEN_SET: height,
        }[kind]
        if kind is DamageType.HOLE:
            size *= 0.5
        missing = int(rng.integers(product.units)) if kind is DamageType.BROKEN_SET else -1
        return Damage(kind, u, v, size, float(depth), int(rng.integers(2**31)), missing)

    def announcements_until(self, t_ms: float, start_ms: float, skip: int = 0
                            ) -> list[Announcement]:
        """The controller's induct events up to `t_ms` (relative), stamped on the wall clock;
        `skip` leaves out the first ones (already sent)."""
        return [
            Announcement(item_id=it.item_id, product_id=it.product.product_id,
                         induct_time_ms=start_ms + it.induct_ms)
            for it in self.items_until(t_ms)[skip:]
        ]
