"""Tying physical items to the sortation controller's announcements.

The controller announces each item at the induct point (ID, product, time or
belt position). An item announced at `t_induct` reaches the camera centre
(belt x = 0) at ``t_induct + (induct_to_camera - belt_position) / speed``; a
tracked item seen at x at time t arrived there at ``t - x / speed``. A track
takes the nearest unclaimed announcement whose expected arrival is within
`association_tolerance_ms`; a merged track (touching items) takes every
announcement whose expected arrival falls inside its footprint. Items nobody
announced get a generated ID. Announcements nobody claims are left to the
deadline scheduler, which publishes `not_seen` at their deadline.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from collections.abc import Callable

    from edge.config import BeltConfig, ItemsConfig
    from edge.types import Announcement

log = structlog.get_logger(__name__)

#: Announcements kept waiting for their item (the deadline scheduler owns them anyway).
_MAX_OPEN = 10_000


class InductAssociator:
    """Thread-safe: announcements come from the MQTT thread, claims from the item stage."""

    def __init__(self, belt: BeltConfig, items: ItemsConfig, *,
                 on_seen: Callable[[str, float], object] | None = None,
                 id_prefix: str = "unannounced") -> None:
        self._belt = belt
        self._tolerance = items.association_tolerance_ms
        self._on_seen = on_seen
        self._prefix = id_prefix
        self._speed = belt.speed_mps  # mm/ms
        self._lock = threading.Lock()
        self._open: OrderedDict[str, tuple[Announcement, float]] = OrderedDict()
        self._claimed: deque[float] = deque(maxlen=64)  # expected arrivals already taken
        self.claimed = 0
        self.unannounced = 0
        self.expired = 0

    def set_speed(self, speed_mps: float) -> None:
        """Belt speed from an encoder or the controller (m/s == mm/ms)."""
        if speed_mps <= 0:
            raise ValueError(f"belt speed must be > 0 m/s, got {speed_mps}")
        with self._lock:
            self._speed = speed_mps

    @property
    def speed_mm_per_ms(self) -> float:
        return self._speed

    def expected_arrival_ms(self, a: Announcement) -> float:
        """When an announced item should cross the camera centre (belt x = 0)."""
        distance = self._belt.induct_to_camera_m * 1000.0 - (a.belt_position_mm or 0.0)
        return a.induct_time_ms + distance / self._speed

    def divert_deadline_ms(self, a: Announcement) -> float:
        """When an announced item reaches the divert point (its position at induct counted)."""
        return self.deadline_ms(0.0, self.expected_arrival_ms(a))

    def deadline_ms(self, x_mm: float, t_ms: float) -> float:
        """When an item seen at belt x at time t reaches the divert point."""
        return t_ms + (self._belt.camera_to_divert_m * 1000.0 - x_mm) / self._speed

    def announce(self, a: Announcement) -> None:
        with self._lock:
            if a.item_id in self._open:
                log.warning("induct.duplicate_announcement", item_id=a.item_id)
                return
            self._open[a.item_id] = (a, self.expected_arrival_ms(a))
            while len(self._open) > _MAX_OPEN:  # nothing seen for a long time: forget the oldest
                self._open.popitem(last=False)
                self.expired += 1

    def pending(self) -> list[Announcement]:
        with self._lock:
            return [a for a, _ in self._open.values()]

    def claim(self, x_mm: float, t_ms: float, extent_x_mm: tuple[float, float], *,
              merged: bool, seen_ms: float) -> list[Announcement]:
        """Announcements for a track seen at (x, t); [] when nobody announced it.

        `seen_ms` is reported to `on_seen` for every claimed announcement.
        """
        with self._lock:
            arrival = t_ms - x_mm / self._speed
            if merged:
                lo = t_ms - extent_x_mm[1] / self._speed
                hi = t_ms - extent_x_mm[0] / self._speed
                ids = [i for i, (_, eta) in self._open.items() if lo <= eta <= hi]
                if not ids:
                    ids = self._nearest(arrival)
            else:
                ids = self._nearest(arrival)
            claimed = []
            for i in ids:
                a, eta = self._open.pop(i)
                claimed.append(a)
                self._claimed.append(eta)
            self._expire(t_ms)
        self.claimed += len(claimed)
        if not claimed:
            self.unannounced += 1
        if self._on_seen is not None:
            for a in claimed:
                self._on_seen(a.item_id, seen_ms)
        return claimed

    def _nearest(self, arrival: float) -> list[str]:
        """The open announcement nearest in time, unless a claimed one is nearer still.

        Falling back to the second-nearest would let one mistake shift every
        following item's ID; such a track is better reported unannounced.
        """
        best, best_err = None, self._tolerance
        for item_id, (_, eta) in self._open.items():
            err = abs(eta - arrival)
            if err <= best_err:
                best, best_err = item_id, err
        if best is not None and any(abs(eta - arrival) < best_err for eta in self._claimed):
            return []
        return [best] if best is not None else []

    def _expire(self, now_ms: float) -> None:
        """Forget announcements whose item is long past the camera (deadlines own them)."""
        horizon = now_ms - 4.0 * self._tolerance - 2000.0
        stale = [i for i, (_, eta) in self._open.items() if eta < horizon]
        for i in stale:
            del self._open[i]
        self.expired += len(stale)

    def generated_id(self, track_id: int, t_ms: float) -> str:
        return f"{self._prefix}-{int(t_ms)}-{track_id}"
