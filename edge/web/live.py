"""What the live page shows, kept cheaply off the hot path and drawn at request time.

`LiveFeed` is a pair of node hooks: it keeps a *reference* to the newest
frameset and a short list of recent verdicts (no copies, no drawing). When
the page asks for a camera image, `camera_jpeg` draws every recently
decided item that should still be in view (its belt position moved on by
the belt speed since capture, projected through the camera's belt pose) as
a box in its verdict colour with its ID, and encodes a JPEG.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import cv2
import numpy as np

from edge.audit.overlays import ascii_text, verdict_bgr
from edge.perception.belt_plane import BeltPlane
from edge.pipeline.node import NodeHooks
from edge.pipeline.stages import Decided
from edge.types import Decision, Frame, FrameSet, U8Array

#: Decided items are drawn for this long after capture (they leave the view anyway).
DRAW_FOR_MS = 3000.0
_JPEG = [cv2.IMWRITE_JPEG_QUALITY, 80]


@dataclass(frozen=True, slots=True)
class LiveItem:
    """What the page needs of one decided item."""

    item_id: str
    product_id: str | None
    decision: Decision
    reasons: tuple[str, ...]
    fused: float | None
    captured_ms: float
    decided_ms: float
    centre_mm: tuple[float, float]
    box_mm: tuple[float, float, float]
    snapshot_id: str | None
    late: bool
    fail_safe: bool

    def as_json(self) -> dict[str, object]:
        return {"item_id": self.item_id, "product_id": self.product_id,
                "decision": self.decision.value, "reasons": list(self.reasons),
                "fused": self.fused, "captured_ms": self.captured_ms,
                "decided_ms": self.decided_ms, "snapshot_id": self.snapshot_id,
                "late": self.late, "fail_safe": self.fail_safe}


@dataclass(frozen=True, slots=True)
class LiveTrack:
    """An item being tracked, not yet decided (drawn amber)."""

    track_id: int
    x_mm: tuple[float, float]  # extent along the belt at `t_ms`
    y_mm: float
    t_ms: float
    width_mm: float
    height_mm: float


def tracks_of(tracker: object) -> list[LiveTrack]:
    """The tracker's open tracks, read without locking (best effort, for display only)."""
    out = []
    try:
        for t in list(getattr(tracker, "tracks", ())):
            boxes = [b for bs in list(t.boxes.values()) for b in bs]
            if not boxes:  # not fully in view yet: the best partial detection's box
                boxes = [det.box_mm for _, det, _ in list(t.best.values())]
            if not boxes:
                continue
            out.append(LiveTrack(t.track_id, t.x_mm, t.y_mm, t.t_ms,
                                 float(np.median([b[1] for b in boxes])),
                                 float(np.median([b[2] for b in boxes]))))
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return out  # the tracker changed under us; the next frame will do
    return out


def footprint_rect(plane: BeltPlane, centre_mm: tuple[float, float],
                   box_mm: tuple[float, float, float]) -> tuple[int, int, int, int] | None:
    """Image rectangle (x0, y0, x1, y1) around an item's belt-frame box; None if not in view."""
    length, width, height = box_mm
    cx, cy = centre_mm
    xs = (cx - length / 2, cx + length / 2)
    ys = (cy - width / 2, cy + width / 2)
    corners = np.array([[x, y, z] for x in xs for y in ys for z in (0.0, max(height, 0.0))],
                       dtype=np.float64)
    cam = plane.pose.inverse().apply(corners)
    if (cam[:, 2] <= 1.0).any():
        return None
    k = plane.intrinsics
    u = k.fx * cam[:, 0] / cam[:, 2] + k.cx
    v = k.fy * cam[:, 1] / cam[:, 2] + k.cy
    x0, x1 = int(max(0.0, u.min())), int(min(k.width - 1.0, u.max()))
    y0, y1 = int(max(0.0, v.min())), int(min(k.height - 1.0, v.max()))
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    return x0, y0, x1, y1


_Seen = TypeVar("_Seen")


def _chain(first: Callable[[_Seen], None] | None,
           second: Callable[[_Seen], None]) -> Callable[[_Seen], None]:
    """`second` after `first` (when there is one), both with the same value."""
    if first is None:
        return second

    def both(value: _Seen) -> None:
        first(value)
        second(value)
    return both


class LiveFeed:
    """Newest frameset and recent verdicts, for the live page."""

    def __init__(self, keep: int = 64) -> None:
        self._lock = threading.Lock()
        self._frames: dict[str, Frame] = {}  # newest frame per camera (framesets may lack one)
        self._framesets = 0
        self._items: deque[LiveItem] = deque(maxlen=keep)
        self._cache: dict[str, tuple[tuple[int, int, int], bytes]] = {}

    def wrap(self, hooks: NodeHooks) -> NodeHooks:
        """`hooks` with this feed's observers chained after the existing ones."""
        return NodeHooks(
            on_decided=_chain(hooks.on_decided, self.on_decided),
            on_acked=hooks.on_acked,
            on_frameset=_chain(hooks.on_frameset, self.on_frameset))

    # --- hooks (stage threads): references only ----------------------------------------------

    def on_frameset(self, frameset: FrameSet) -> None:
        with self._lock:
            self._frames.update(frameset.frames)
            self._framesets += 1

    def on_decided(self, decided: Decided) -> None:
        r, v = decided.record, decided.verdict
        item = LiveItem(v.item_id, v.product_id, v.decision, tuple(x.value for x in v.reasons),
                        v.scores.fused if v.scores is not None else None, r.captured_ms,
                        v.decided_ms, r.centre_mm, r.box_mm, v.snapshot_id, v.late, v.fail_safe)
        with self._lock:
            self._items.append(item)

    # --- request time -----------------------------------------------------------------------

    def framesets_seen(self) -> int:
        with self._lock:
            return self._framesets

    def recent(self, n: int) -> list[LiveItem]:
        """The newest `n` decided items, newest first."""
        with self._lock:
            return list(self._items)[-n:][::-1]

    def camera_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._frames)

    def camera_jpeg(self, camera_id: str, planes: Mapping[str, BeltPlane],
                    speed_mm_per_ms: float, tracks: Sequence[LiveTrack] = ()) -> bytes | None:
        """The newest frame of one camera with the recent items drawn on; None if no frame yet."""
        with self._lock:
            frame = self._frames.get(camera_id)
            cached = self._cache.get(camera_id)
            items = list(self._items)
        if frame is None:
            return None
        key = (frame.index, len(items), id(items[-1]) if items else 0)
        if cached is not None and cached[0] == key:
            return cached[1]
        img = annotate(frame, planes.get(camera_id), items, speed_mm_per_ms, tracks)
        ok, buf = cv2.imencode(".jpg", img, _JPEG)
        if not ok:
            return None
        data = buf.tobytes()
        with self._lock:
            self._cache[camera_id] = (key, data)
        return data


def _draw_box(img: U8Array, rect: tuple[int, int, int, int], colour: tuple[int, int, int],
              text: str) -> None:
    x0, y0, x1, y1 = rect
    cv2.rectangle(img, (x0, y0), (x1, y1), colour, 2)
    label = ascii_text(text, 32)
    (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
    ty = y0 - 4 if y0 > th + 6 else y1 + th + 4
    x0 = max(0, min(x0, img.shape[1] - tw - 4))  # keep the label inside the image
    cv2.rectangle(img, (x0, ty - th - 3), (x0 + tw + 4, ty + 3), colour, -1)
    cv2.putText(img, label, (x0 + 2, ty), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1,
                cv2.LINE_AA)


def annotate(frame: Frame, plane: BeltPlane | None, items: Sequence[LiveItem],
             speed_mm_per_ms: float, tracks: Sequence[LiveTrack] = ()) -> U8Array:
    """A copy of the frame's colour image with item boxes, IDs and verdict colours
    (amber: still being tracked; red: sideline; green: pass)."""
    img: U8Array = frame.color.copy()
    if plane is not None:
        for track in tracks:
            dx = speed_mm_per_ms * (frame.timestamp_ms - track.t_ms)
            x0, x1 = track.x_mm
            rect = footprint_rect(plane, ((x0 + x1) / 2 + dx, track.y_mm),
                                  (x1 - x0, track.width_mm, track.height_mm))
            if rect is not None:
                _draw_box(img, rect, verdict_bgr(None), f"#{track.track_id} tracking")
        for item in items:
            age = frame.timestamp_ms - item.captured_ms
            if not -DRAW_FOR_MS < age < DRAW_FOR_MS:
                continue
            centre = (item.centre_mm[0] + speed_mm_per_ms * age, item.centre_mm[1])
            rect = footprint_rect(plane, centre, item.box_mm)
            if rect is not None:
                _draw_box(img, rect, verdict_bgr(item.decision),
                          f"{item.item_id} {item.decision.value.upper()}")
    stamp = ascii_text(f"{frame.camera_id}  frame {frame.index}  t={frame.timestamp_ms:.0f} ms")
    (tw, th), _ = cv2.getTextSize(stamp, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
    h = img.shape[0]
    cv2.rectangle(img, (0, h - th - 12), (tw + 12, h), (0, 0, 0), -1)
    cv2.putText(img, stamp, (6, h - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1,
                cv2.LINE_AA)
    return img
