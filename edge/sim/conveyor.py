"""The synthetic conveyor behind the `FrameSource` interface.

`SyntheticConveyor` is the world (belt, cameras, item schedule, ground truth);
`SyntheticSource` is one of its cameras. Frames are deterministic by seed:
frame k of camera c always has the same bytes, whatever order they are
rendered in. In real-time mode a source behaves like a camera whose buffer
overflows when nobody reads: it skips to the current frame and counts drops.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import structlog

from edge.capture.buffers import FrameBuffers
from edge.capture.source import EndOfStream, SourceCounters
from edge.catalogue import Catalogue
from edge.clock import Clock
from edge.config import BeltConfig, CameraConfig, SyntheticConfig
from edge.sim.nuisance import BeltDirt, apply_lighting, draw_lighting, drop_depth_patches
from edge.sim.render import CameraRig, SceneRenderer, TopCache, add_sensor_noise
from edge.sim.world import ItemSchedule, SceneItem
from edge.types import Announcement, Frame, FrameTruth, Intrinsics, Pose

log = structlog.get_logger(__name__)

#: Colour intrinsics of a D435 at 640x480 (fx, fy scale with resolution).
_D435_FX_640 = 615.0
#: Default rig, in the belt frame: a top-down camera and an oblique one that sees the -y side.
_RIG = {
    0: (np.array([0.0, 0.0, 900.0]), np.array([0.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])),
    1: (np.array([0.0, -620.0, 700.0]), np.array([0.0, 0.0, 40.0]), np.array([0.0, 0.0, 1.0])),
}
#: Per-camera clock offset (ms) and timestamp jitter (ms), as between two unsynced USB cameras.
_CLOCK_OFFSET_MS = (0.0, 3.0, -2.0, 5.0)
_JITTER_MS = 0.5


def default_intrinsics(width: int, height: int) -> Intrinsics:
    f = _D435_FX_640 * width / 640.0
    return Intrinsics(width, height, f, f, (width - 1) / 2.0, (height - 1) / 2.0)


def default_pose(index: int) -> Pose:
    eye, target, up = _RIG.get(index, _RIG[index % 2])
    if index >= 2:  # further cameras stand downstream of the first two
        eye = eye + np.array([150.0 * index, 0.0, 0.0])
        target = target + np.array([150.0 * index, 0.0, 0.0])
    return Pose.look_at(eye, target, up)


class SyntheticConveyor:
    """The synthetic world: a belt with items under N cameras."""

    def __init__(self, cfg: SyntheticConfig, belt: BeltConfig, cameras: Sequence[CameraConfig],
                 catalogue: Catalogue, start_ms: float,
                 poses: dict[str, Pose] | None = None) -> None:
        self.cfg = cfg
        self.belt = belt
        self.catalogue = catalogue
        self.start_ms = start_ms
        self.schedule = ItemSchedule(cfg, belt, catalogue)
        self._cams = {c.id: c for c in cameras}
        self._index = {c.id: i for i, c in enumerate(cameras)}
        self._rigs = {
            c.id: CameraRig(c.id, default_intrinsics(c.width, c.height),
                            (poses or {}).get(c.id) or default_pose(i), belt.width_mm, cfg.seed)
            for i, c in enumerate(cameras)
        }
        tops = TopCache()
        self._renderers = {c.id: SceneRenderer(tops) for c in cameras}
        self._dirt = BeltDirt(cfg.nuisance, cfg.seed, belt.width_mm) if cfg.nuisance else None
        self._buffers = {c.id: FrameBuffers() for c in cameras}
        self._induct_x = -belt.induct_to_camera_m * 1000.0
        #: items inducted at or after this world time (ms) never appear (a run's end)
        self.induct_cutoff_ms = float("inf")

    @property
    def camera_ids(self) -> tuple[str, ...]:
        return tuple(self._cams)

    def camera_pose(self, camera_id: str) -> Pose:
        return self._rigs[camera_id].pose

    def intrinsics(self, camera_id: str) -> Intrinsics:
        return self._rigs[camera_id].intrinsics

    def fps(self, camera_id: str) -> int:
        return self._cams[camera_id].fps

    def capture_time_ms(self, camera_id: str, index: int) -> float:
        """True exposure time of frame `index` (ms since the world start)."""
        return index * 1000.0 / self._cams[camera_id].fps

    def frame_time_ms(self, camera_id: str, index: int) -> float:
        """The timestamp the camera stamps on frame `index` (wall clock, with offset and jitter)."""
        i = self._index[camera_id]
        rng = np.random.default_rng([self.cfg.seed, i, index, 7])
        jitter = rng.uniform(-_JITTER_MS, _JITTER_MS)
        offset = _CLOCK_OFFSET_MS[i % len(_CLOCK_OFFSET_MS)]
        return self.start_ms + self.capture_time_ms(camera_id, index) + offset + float(jitter)

    def items_at(self, camera_id: str, t_ms: float) -> list[tuple[SceneItem, float]]:
        """Items in view of a camera at world time `t_ms`, with their belt-frame x."""
        lo, hi = self._rigs[camera_id].view_x_mm
        v = self.schedule.speed_mm_per_ms
        out = []
        for item in self.schedule.items_until(min(t_ms, self.induct_cutoff_ms)):
            if item.induct_ms >= self.induct_cutoff_ms:
                continue
            x = item.x_mm(t_ms, v, self._induct_x)
            if lo <= x <= hi:
                out.append((item, x))
        return out

    def render(self, camera_id: str, index: int) -> Frame:
        """Frame `index` of a camera, with ground truth."""
        rig = self._rigs[camera_id]
        t = self.capture_time_ms(camera_id, index)
        placed = self.items_at(camera_id, t)
        dirt = self._dirt
        belt = None if dirt is None else (
            lambda color: dirt.draw(rig, color, t * self.schedule.speed_mm_per_ms))
        view = self._renderers[camera_id].render(rig, placed, belt)
        cam = self._index[camera_id]
        rng = np.random.default_rng([self.cfg.seed, cam, index])
        seen, damage, noise_scale = view.color, view.damage, self.cfg.depth_noise_scale
        level = self.cfg.nuisance
        if level:
            period = self.cfg.nuisance_period_ms
            key = index if period <= 0 else int(t // period)
            light_rng = np.random.default_rng([self.cfg.seed, cam, key, 0x119E])
            light = draw_lighting(level, light_rng, (rig.intrinsics.width,
                                                     rig.intrinsics.height),
                                  self.schedule.speed_mm_per_ms)
            seen, damage = apply_lighting(view.color, view.damage, light, rig)
            noise_scale *= 1.0 + 0.5 * level * float(light_rng.random())
        color, depth = add_sensor_noise(view, rig, rng, index, self._buffers[camera_id],
                                        color=seen, depth_noise_scale=noise_scale)
        if level:
            drop_depth_patches(depth, level,
                               np.random.default_rng([self.cfg.seed, cam, index, 0xD809]))
        truth = FrameTruth(
            labels=view.labels,
            damage_mask=damage,
            items=tuple(item.truth for item, _ in placed),
            centres_mm=tuple((x, item.y_mm, item.dims_mm[2] / 2) for item, x in placed),
            yaws_rad=tuple(item.yaw_rad for item, _ in placed),
        )
        return Frame(
            camera_id=camera_id,
            index=index,
            timestamp_ms=self.frame_time_ms(camera_id, index),
            color=color,
            depth=depth,
            depth_scale_m=0.001,
            intrinsics=rig.intrinsics,
            truth=truth,
        )

    def announcements_until(self, t_ms: float, skip: int = 0) -> list[Announcement]:
        """Induct events the controller has sent by world time `t_ms` (after the first `skip`)."""
        return self.schedule.announcements_until(min(t_ms, self.induct_cutoff_ms), self.start_ms,
                                                 skip)

    def due_announcements(self, wall_ms: float, skip: int = 0) -> list[Announcement]:
        """What a controller has announced by `wall_ms` on the wall clock (the controller
        simulator polls this)."""
        return self.announcements_until(wall_ms - self.start_ms, skip)

    def frame_buffers(self, camera_id: str) -> FrameBuffers:
        """Where a camera's frames are rendered to (see `edge.capture.buffers`)."""
        return self._buffers[camera_id]

    def arrival_delay_ms(self) -> float:
        """Time from the induct point to the camera centre."""
        return self.belt.induct_to_camera_m / self.belt.speed_mps * 1000.0


class SyntheticSource:
    """One camera of a `SyntheticConveyor`, behind the `FrameSource` protocol."""

    def __init__(self, world: SyntheticConveyor, camera_id: str, clock: Clock, *,
                 realtime: bool = True, max_frames: int | None = None) -> None:
        self._world = world
        self._camera_id = camera_id
        self._clock = clock
        self._realtime = realtime
        self._max_frames = max_frames
        self._next = 0
        self._counters = SourceCounters()
        self._stop = threading.Event()

    @property
    def camera_id(self) -> str:
        return self._camera_id

    @property
    def counters(self) -> SourceCounters:
        return self._counters

    @property
    def frame_buffers(self) -> FrameBuffers:
        return self._world.frame_buffers(self._camera_id)

    def start(self) -> None:
        self._stop.clear()
        log.info("camera_started", camera=self._camera_id, source="synthetic",
                 timestamp_domain="global (simulated)")

    def stop(self) -> None:
        self._stop.set()

    def read(self, timeout_s: float) -> Frame | None:
        if self._max_frames is not None and self._next >= self._max_frames:
            raise EndOfStream(f"synthetic camera {self._camera_id}: {self._max_frames} frames done")
        index = self._next
        if self._realtime:
            period = 1000.0 / self._world.fps(self._camera_id)
            now = self._clock.now_ms()
            newest = int((now - self._world.start_ms) // period)
            if newest > index:  # the camera's one-frame buffer overflowed while nobody read
                # Frames before the first read are not drops: a camera's stream starts when
                # it is first read, and the RealSense source counts gaps the same way.
                if self._counters.frames_received:
                    self._counters.frames_dropped += newest - index
                index = newest
            due = self._world.frame_time_ms(self._camera_id, index)
            if due - now > timeout_s * 1000.0:
                self._clock.sleep_until(now + timeout_s * 1000.0, self._stop)
                self._counters.timeouts += 1
                return None
            if not self._clock.sleep_until(due, self._stop):
                return None
        frame = self._world.render(self._camera_id, index)
        self._next = index + 1
        self._counters.frames_received += 1
        self._counters.buffers_allocated = self.frame_buffers.allocated
        return frame
