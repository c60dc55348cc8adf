"""Tracking items along the belt across frames and cameras; one `ItemRecord` per physical item.

Every camera's detections live in the belt frame, so one tracker serves all
cameras: a track's footprint moves with the belt speed, and a detection
joins the track whose predicted leading or trailing edge it matches (an item
cut off by the image border still shows one true edge). Complete detections
(fully inside the image) update the position and vote on the box and on
`merged`; per camera the most central complete view is kept for the crop.
A track becomes an `ItemRecord` (tied to the controller's announcement) as soon
as no camera can see it more centrally, or once it is `emit_past_centre_mm`
past the cameras' centre; at the latest when it has been unseen for
`lost_after_ms` (it has left the inspection region).
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from edge.perception.belt_plane import BeltPlane
from edge.perception.crops import CROP_MARGIN, rectify_item
from edge.types import ItemCrop, ItemRecord, ItemTruth

if TYPE_CHECKING:
    from collections.abc import Mapping

    from edge.config import ItemsConfig
    from edge.perception.induct import InductAssociator
    from edge.perception.segmentation import Detection, ItemSegmenter
    from edge.types import FrameSet, Pose

#: Edge-position gate (mm) for a detection to join a track.
GATE_X_MM = 70.0
GATE_Y_MM = 80.0


@dataclass(slots=True)
class Track:
    track_id: int
    x_mm: tuple[float, float]  # footprint extent along the belt at `t_ms`
    y_mm: float
    t_ms: float
    first_seen_ms: float
    last_seen_ms: float
    fixed: bool = False  # has had a complete detection
    primary_seen: bool = False  # the top-down camera has seen it
    sightings: int = 0
    votes: dict[str, list[bool]] = field(default_factory=dict)  # camera -> merged? per view
    boxes: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)
    emitted: bool = False  # its record went out early; later sightings are absorbed
    best: dict[str, tuple[float, Detection, float]] = field(default_factory=dict)

    def predicted(self, t_ms: float, speed: float) -> tuple[float, float]:
        dx = (t_ms - self.t_ms) * speed
        return self.x_mm[0] + dx, self.x_mm[1] + dx


class ItemTracker:
    """Turns framesets into item records (one sync stage owns it; not thread-safe)."""

    def __init__(self, segmenters: Mapping[str, ItemSegmenter], associator: InductAssociator,
                 cfg: ItemsConfig) -> None:
        self.segmenters = dict(segmenters)
        self.associator = associator
        self.cfg = cfg
        self.tracks: list[Track] = []
        self._ids = itertools.count(1)
        # The camera that looks most straight down measures boxes best.
        self.primary = max(self.segmenters, key=lambda c: -float(
            self.segmenters[c].plane.pose.rotation[2, 2]))
        #: CPU time (ms, this thread) of segmentation + tracking per frameset, the most recent ones
        self.cpu_ms: deque[float] = deque(maxlen=10_000)
        #: oblique-view detections that matched no track of the primary camera (ignored)
        self.unmatched_views = 0
        self._primary_seen_ms = -float("inf")  # the primary camera's latest frameset
        #: belt x (mm) where each camera's optical axis meets the belt: its most central view
        self._axis_x = {c: _axis_belt_x(s.plane.pose) for c, s in self.segmenters.items()}
        self._gaps: deque[float] = deque(maxlen=15)  # recent frameset intervals (ms)
        self._last_fs_ms: float | None = None
        self._period_ms: float | None = None  # their median: when the next frameset comes

    def process(self, fs: FrameSet, found: Mapping[str, list[Detection]] | None = None
                ) -> list[ItemRecord]:
        """Detect, track and emit the records of items that have left the view.

        `found`: detections per camera made elsewhere (`segmentation_workers`);
        without it each frame is segmented here.
        """
        start = time.thread_time()
        speed = self.associator.speed_mm_per_ms
        if self._last_fs_ms is not None and fs.timestamp_ms > self._last_fs_ms:
            self._gaps.append(fs.timestamp_ms - self._last_fs_ms)
            self._period_ms = statistics.median(self._gaps)
        self._last_fs_ms = fs.timestamp_ms
        # The top-down camera decides what is an item; oblique views only add views to its
        # tracks (their blobs of tall or neighbouring items are ambiguous), unless it is gone.
        # Gone means silent for `lost_after_ms`, not missing from this frameset: a node behind
        # its cameras drops frames per camera, and an oblique sliver that started a track in
        # such a gap would become a second, unannounced item.
        if self.primary in fs.frames:
            self._primary_seen_ms = fs.timestamp_ms
        primary_here = fs.timestamp_ms - self._primary_seen_ms <= self.cfg.lost_after_ms
        order = sorted(fs.frames, key=lambda c: c != self.primary)
        for camera_id in order:
            frame = fs.frames[camera_id]
            seg = self.segmenters.get(camera_id)
            if seg is None:
                continue
            taken: set[int] = set()
            dets = found.get(camera_id, []) if found is not None else seg.detect(frame)
            for det in dets:
                track = self._match(det, fs.timestamp_ms, speed, taken)
                if track is None:
                    oblique = primary_here and camera_id != self.primary
                    if oblique or self._covers_known(det, fs.timestamp_ms, speed):
                        self.unmatched_views += 1
                        continue
                    track = self._new_track(det, fs.timestamp_ms)
                taken.add(track.track_id)
                self._update(track, det, fs.timestamp_ms, speed)
        records = self._finish(fs.timestamp_ms - self.cfg.lost_after_ms, fs.timestamp_ms)
        self.cpu_ms.append((time.thread_time() - start) * 1000.0)
        return records

    def flush(self) -> list[ItemRecord]:
        """Records for every track still open (end of a run)."""
        return self._finish(float("inf"))

    # -- association ---------------------------------------------------------------------

    def _match(self, det: Detection, t: float, speed: float, taken: set[int]) -> Track | None:
        """The track whose predicted edge is nearest; for a view cut off by the image border
        (which may also hold a sliver of a neighbour) the track it mostly overlaps."""
        best, best_d = None, GATE_X_MM
        fallback, best_overlap = None, 0.5
        for track in self.tracks:
            if track.track_id in taken:
                continue
            lo, hi = track.predicted(t, speed)
            if abs(track.y_mm - det.centre_mm[1]) <= GATE_Y_MM:
                d = min(abs(lo - det.extent_x_mm[0]), abs(hi - det.extent_x_mm[1]))
                if d < best_d:
                    best, best_d = track, d
            if not det.complete and det.extent_y_mm[0] <= track.y_mm <= det.extent_y_mm[1]:
                d_lo, d_hi = det.extent_x_mm
                overlap = (min(hi, d_hi) - max(lo, d_lo)) / max(1.0, min(hi - lo, d_hi - d_lo))
                if overlap > best_overlap:
                    fallback, best_overlap = track, overlap
        return best or fallback

    def _covers_known(self, det: Detection, t: float, speed: float) -> bool:
        """A blob over much of a tracked item is that item fused with a neighbour (e.g. by a
        tall side face at the image edge), not a new item: new items enter the view upstream."""
        d_lo, d_hi = det.extent_x_mm
        for track in self.tracks:
            lo, hi = track.predicted(t, speed)
            if not det.extent_y_mm[0] <= track.y_mm <= det.extent_y_mm[1]:
                continue
            if min(hi, d_hi) - max(lo, d_lo) > 0.3 * max(1.0, hi - lo):
                return True
        return False

    def _new_track(self, det: Detection, t: float) -> Track:
        track = Track(next(self._ids), det.extent_x_mm, det.centre_mm[1], t, t, t)
        self.tracks.append(track)
        return track

    def _update(self, track: Track, det: Detection, t: float, speed: float) -> None:
        track.sightings += 1
        track.last_seen_ms = t
        primary = det.camera_id == self.primary
        track.primary_seen = track.primary_seen or primary
        # Where the item is, the top view says: an oblique view of a track the top camera has
        # seen only adds a view (its blob is displaced sideways for tall items).
        if primary or not track.primary_seen:
            if det.complete or not track.fixed:
                track.x_mm, track.y_mm, track.t_ms = det.extent_x_mm, det.centre_mm[1], t
            else:
                track.x_mm, track.t_ms = track.predicted(t, speed), t
        if det.complete:
            track.fixed = True
            track.boxes.setdefault(det.camera_id, []).append(det.box_mm)
            track.votes.setdefault(det.camera_id, []).append(det.merged)
        score = self._view_score(det)
        current = track.best.get(det.camera_id)
        if current is None or score > current[0]:
            track.best[det.camera_id] = (score, det, t)

    def _view_score(self, det: Detection) -> float:
        """Higher is better: complete views first, then the most central one."""
        intr = self.segmenters[det.camera_id].plane.intrinsics
        x0, y0, x1, y1 = det.roi
        off = abs(0.5 * (x0 + x1) - intr.cx) / intr.width + abs(0.5 * (y0 + y1) - intr.cy) / (
            intr.height)
        return (1.0 if det.complete else 0.0) - 0.5 * off

    # -- records -------------------------------------------------------------------------

    def _ready_early(self, track: Track, now_ms: float) -> bool:
        """Fully seen, and its best views will not get better: past the cameras' centre, or
        past where any camera could see it more centrally."""
        past = self.cfg.emit_past_centre_mm
        if past is None or track.emitted or not track.fixed:
            return False
        if track.sightings < self.cfg.min_observations or len(track.best) < len(self.segmenters):
            return False
        speed = self.associator.speed_mm_per_ms
        lo, hi = track.predicted(now_ms, speed)
        if 0.5 * (lo + hi) > past:
            return True
        return self._views_final(track, now_ms, speed)

    def _views_final(self, track: Track, now_ms: float, speed: float) -> bool:
        """No camera can see the item more centrally any more: from the next frame on, it is
        farther past each camera's axis than that camera's best (complete) view was from it.
        Saves up to two frame intervals against `emit_past_centre_mm` alone."""
        if self._period_ms is None:
            return False
        lo, hi = track.predicted(now_ms + self._period_ms, speed)
        x_next = 0.5 * (lo + hi)
        for camera_id, (_, det, _) in track.best.items():
            axis = self._axis_x[camera_id]
            if axis is None or not det.complete:
                return False
            if x_next - axis < abs(det.centre_mm[0] - axis):
                return False
        return True

    def _finish(self, cutoff_ms: float, now_ms: float | None = None) -> list[ItemRecord]:
        early = [t for t in self.tracks if now_ms is not None and self._ready_early(t, now_ms)]
        done = [t for t in self.tracks if t.last_seen_ms < cutoff_ms]
        self.tracks = [t for t in self.tracks if t.last_seen_ms >= cutoff_ms]
        records: list[ItemRecord] = []
        for track in early:
            track.emitted = True
            records.extend(self._records(track))
        for track in sorted(done, key=lambda t: t.first_seen_ms):
            if track.emitted:
                continue
            # Never fully in view (e.g. at the belt edge): trust it after one more sighting.
            needed = self.cfg.min_observations + (0 if track.fixed else 1)
            if track.sightings >= needed:
                records.extend(self._records(track))
        return records

    def _box(self, track: Track) -> tuple[float, float, float]:
        boxes = track.boxes.get(self.primary) or next(iter(track.boxes.values()), None)
        if not boxes:
            _, det, _ = max(track.best.values(), key=lambda b: b[0])
            return det.box_mm
        return (statistics.median(b[0] for b in boxes), statistics.median(b[1] for b in boxes),
                statistics.median(b[2] for b in boxes))

    def _records(self, track: Track) -> list[ItemRecord]:
        ref_cam = self.primary if self.primary in track.best else max(
            track.best, key=lambda c: track.best[c][0])
        _, ref, t_cap = track.best[ref_cam]
        votes = track.votes.get(self.primary) or [v for vs in track.votes.values() for v in vs]
        merged = 2 * sum(votes) > len(votes)
        claims = self.associator.claim(ref.centre_mm[0], t_cap, ref.extent_x_mm, merged=merged,
                                       seen_ms=t_cap)
        crops = {cam: self.crop(det) for cam, (_, det, _) in track.best.items()}
        # One record of what was seen, then one per announcement that claims it.
        seen = ItemRecord(
            track_id=track.track_id, item_id=self.associator.generated_id(track.track_id, t_cap),
            product_id=None, first_seen_ms=track.first_seen_ms, captured_ms=t_cap,
            deadline_ms=self.associator.deadline_ms(ref.centre_mm[0], t_cap),
            box_mm=self._box(track), centre_mm=ref.centre_mm, crops=crops,
            views_missing=tuple(c for c in self.segmenters if c not in track.best),
            merged=merged, truth=truth_of(ref), unannounced=not claims)
        if not claims:
            return [seen]
        return [dataclasses.replace(seen, item_id=a.item_id, product_id=a.product_id)
                for a in claims]

    def crop(self, det: Detection) -> ItemCrop:
        """The model crop of one view (rectified, `crop_size` square)."""
        return crop_detection(det, self.segmenters[det.camera_id].plane, self.cfg.crop_size)


def _axis_belt_x(pose: Pose) -> float | None:
    """Belt x (mm) where the camera's optical axis meets the belt plane (None: it does not)."""
    direction = pose.rotation @ np.array([0.0, 0.0, 1.0])
    if direction[2] > -1e-6:
        return None
    reach = -float(pose.translation_mm[2]) / float(direction[2])
    return float(pose.translation_mm[0]) + reach * float(direction[0])


def crop_detection(det: Detection, plane: BeltPlane, size: int) -> ItemCrop:
    """The model crop of one detection; the training-set writer cuts items the same way."""
    frame = det.frame
    x0, y0, x1, y1 = det.roi
    # The rectified square reaches out to about 0.9 of the long side from the centre when
    # the item lies diagonally: cut wide enough that it never samples past the cut-out.
    pad = int(max(x1 - x0, y1 - y0) * (0.45 + CROP_MARGIN)) + 4
    h, w = frame.depth.shape
    px0, py0, px1, py1 = max(0, x0 - pad), max(0, y0 - pad), min(w, x1 + pad), min(h, y1 + pad)
    mask = np.zeros((py1 - py0, px1 - px0), bool)
    mask[y0 - py0:y1 - py0, x0 - px0:x1 - px0] = det.mask
    heights = plane.height_map(frame.depth, frame.depth_scale_m, roi=(px0, py0, px1, py1))
    damage = None
    if frame.truth is not None:
        labels = frame.truth.labels[py0:py1, px0:px1]
        label = _majority_label(labels, mask)
        damage = frame.truth.damage_mask[py0:py1, px0:px1] & ((labels == 0) | (labels == label))
    return rectify_item(det.camera_id, frame.color[py0:py1, px0:px1], heights, mask, size,
                        truth_damage=damage)


def _majority_label(labels: np.ndarray, mask: np.ndarray) -> int:
    values = labels[mask]
    values = values[values > 0]
    if values.size == 0:
        return 0
    return int(np.bincount(values).argmax())


def truth_of(det: Detection) -> ItemTruth | None:
    """Synthetic ground truth of the item most of a detection's pixels belong to."""
    truth = det.frame.truth
    if truth is None:
        return None
    x0, y0, x1, y1 = det.roi
    label = _majority_label(truth.labels[y0:y1, x0:x1], det.mask)
    return truth.items[label - 1] if label > 0 else None
