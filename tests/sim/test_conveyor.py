"""The synthetic conveyor: deterministic, geometrically exact before noise, labels that match."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.capture.source import EndOfStream
from edge.catalogue import load_catalogue
from edge.clock import ManualClock
from edge.config import Config, load_config
from edge.perception.belt_plane import BeltPlane
from edge.sim.conveyor import SyntheticConveyor, SyntheticSource, default_intrinsics
from edge.sim.render import DEPTH_NOISE_K
from edge.types import DamageType, Pose


@pytest.fixture(scope="module")
def cfg() -> Config:
    return load_config(None)


def _world(cfg: Config, seed: int = 7, **kw: float) -> SyntheticConveyor:
    syn = dataclasses.replace(cfg.synthetic, seed=seed, **kw)
    return SyntheticConveyor(syn, cfg.belt, cfg.cameras, load_catalogue(), start_ms=1.7e12)


def _busy_index(world: SyntheticConveyor, cam: str) -> int:
    for k in range(40, 400):
        if len(world.items_at(cam, world.capture_time_ms(cam, k))) >= 2:
            return k
    raise AssertionError("no busy frame")


def _fully_in_view(mask: np.ndarray) -> bool:
    rows, cols = np.nonzero(mask)
    return bool(rows.size > 5000 and cols.min() > 0 and cols.max() < mask.shape[1] - 1
                and rows.min() > 0 and rows.max() < mask.shape[0] - 1)


def test_same_seed_same_bytes_in_any_order(cfg: Config) -> None:
    """Frame k of a camera has the same bytes whatever was rendered before it."""
    a, b = _world(cfg, damage_rate=0.5), _world(cfg, damage_rate=0.5)
    k = _busy_index(a, "top")
    fa = a.render("top", k)
    for j in (k + 5, k - 3, k + 1):  # b renders other frames first
        b.render("top", j)
        b.render("angled", j)
    fb = b.render("top", k)
    assert fa.color.tobytes() == fb.color.tobytes()
    assert fa.depth.tobytes() == fb.depth.tobytes()
    assert fa.timestamp_ms == fb.timestamp_ms
    other = _world(cfg, seed=8, damage_rate=0.5).render("top", k)
    assert other.depth.tobytes() != fa.depth.tobytes()


def test_a_frame_held_keeps_its_bytes_while_later_frames_reuse_buffers(cfg: Config) -> None:
    """Rendered frames come from reused buffers: one kept by a consumer is not overwritten
    by the frames rendered after it, and frames let go cost no new buffers."""
    world, fresh = _world(cfg, damage_rate=0.5), _world(cfg, damage_rate=0.5)
    k = _busy_index(world, "top")
    kept = world.render("top", k)
    crop = world.render("angled", k).depth[100:200, 100:300]
    for j in range(k + 1, k + 20):
        world.render("top", j)
        world.render("angled", j)
    assert kept.color.tobytes() == fresh.render("top", k).color.tobytes()
    assert kept.depth.tobytes() == fresh.render("top", k).depth.tobytes()
    assert crop.tobytes() == fresh.render("angled", k).depth[100:200, 100:300].tobytes()
    # kept (2), crop (1), and the one pair in use at a time per camera
    assert (world.frame_buffers("top").allocated
            + world.frame_buffers("angled").allocated) <= 7


def test_belt_depth_matches_pose_and_intrinsics(cfg: Config) -> None:
    """Before noise, every belt pixel back-projects onto the plane z = 0 within 1 mm."""
    world = _world(cfg, items_per_second=0.0)
    for cam in world.camera_ids:
        rig = world._rigs[cam]
        k = rig.intrinsics
        v, u = np.mgrid[0 : k.height, 0 : k.width]
        z = rig.background_depth.astype(np.float64)
        pts_cam = np.stack([(u - k.cx) / k.fx * z, (v - k.cy) / k.fy * z, z], axis=-1)
        belt = rig.pose.apply(pts_cam.reshape(-1, 3))
        assert np.abs(belt[:, 2]).max() < 1.0


@settings(max_examples=40, deadline=None)
@given(
    x=st.floats(-300, 300), y=st.floats(-300, 300), height=st.floats(500, 1500),
    tilt=st.floats(0, 50), azimuth=st.floats(0, 360),
)
def test_belt_plane_round_trip(x: float, y: float, height: float, tilt: float,
                               azimuth: float) -> None:
    """For any camera looking at the belt, depth -> belt point -> pixel returns to the pixel."""
    a, t = np.deg2rad(azimuth), np.deg2rad(tilt)
    eye = np.array([x + height * np.tan(t) * np.cos(a), y + height * np.tan(t) * np.sin(a), height])
    pose = Pose.look_at(eye, np.array([x, y, 0.0]), np.array([0.0, 0.0, 1.0]))
    plane = BeltPlane(default_intrinsics(160, 120), pose)
    pts = plane.points(plane.belt_depth_mm)
    ok = plane.belt_depth_mm > 0
    assert ok[60, 80]
    assert np.abs(pts[..., 2][ok]).max() < 0.05 * height / 100
    px = plane.project(pts[ok].astype(np.float64))
    v, u = np.nonzero(ok)
    assert np.abs(px[:, 0] - u).max() < 1e-2
    assert np.abs(px[:, 1] - v).max() < 1e-2
    depth_u16 = np.round(plane.belt_depth_mm).astype(np.uint16)
    heights = plane.height_map(depth_u16, 0.001)
    assert np.nanmax(np.abs(heights[ok])) < 1.0  # rounding to 1 mm units


def test_labels_agree_with_boxes(cfg: Config) -> None:
    """Each labelled pixel lies on its item's box: inside the footprint, below its top."""
    world = _world(cfg, damage_rate=0.0)
    for cam in world.camera_ids:
        k = _busy_index(world, cam)
        frame = world.render(cam, k)
        truth = frame.truth
        assert truth is not None
        rig = world._rigs[cam]
        view_depth = rig.plane  # noise-free depth comes from the renderer
        placed = world.items_at(cam, world.capture_time_ms(cam, k))
        clean = world._renderers[cam].render(rig, placed)
        pts = view_depth.points(clean.depth_mm)
        for i, item in enumerate(truth.items):
            mask = clean.labels == i + 1
            assert np.array_equal(mask, truth.labels == i + 1)
            if not mask.any():
                continue
            cx, cy, _ = truth.centres_mm[i]
            yaw = truth.yaws_rad[i]
            p = pts[mask]
            du = (p[:, 0] - cx) * np.cos(yaw) + (p[:, 1] - cy) * np.sin(yaw)
            dv = -(p[:, 0] - cx) * np.sin(yaw) + (p[:, 1] - cy) * np.cos(yaw)
            length, width, height = item.box_mm
            assert np.abs(du).max() <= length / 2 + 1.0
            assert np.abs(dv).max() <= width / 2 + 1.0
            assert p[:, 2].max() <= height + 1.0
            assert p[:, 2].min() >= -1.0


def test_damage_ground_truth_marks_damaged_items_only(cfg: Config) -> None:
    """Damage pixels belong to damaged items (or spills beside them); intact items have none."""
    world = _world(cfg, damage_rate=0.5)
    seen_damaged = 0
    for k in range(60, 600, 9):
        frame = world.render("top", k)
        truth = frame.truth
        assert truth is not None
        for i, item in enumerate(truth.items):
            on_item = truth.damage_mask & (truth.labels == i + 1)
            if item.damage is None:
                assert not on_item.any(), item
            elif item.damage in (DamageType.HOLE, DamageType.TEAR, DamageType.CRUSH,
                                 DamageType.DECONSTRUCTION) and _fully_in_view(
                                     truth.labels == i + 1):
                seen_damaged += 1
                assert on_item.any(), item
    assert seen_damaged >= 3


def test_depth_noise_follows_stereo_model(cfg: Config) -> None:
    """Belt depth noise has sigma ~ K z^2 and a small share of dropped pixels."""
    world = _world(cfg, items_per_second=0.0)
    frame = world.render("top", 0)
    rig = world._rigs["top"]
    centre = (slice(200, 280), slice(280, 360))
    err = frame.depth[centre].astype(np.float64) - rig.background_depth[centre]
    valid = frame.depth[centre] > 0
    expected = DEPTH_NOISE_K * 900.0**2
    assert 0.7 * expected < err[valid].std() < 1.3 * expected
    assert (frame.depth == 0).mean() < 0.02


def test_source_paces_in_real_time_and_counts_drops(cfg: Config) -> None:
    """A real-time source waits for each frame's time and skips frames nobody read."""
    clock = ManualClock(start_ms=1.7e12)
    world = _world(cfg)
    src = SyntheticSource(world, "top", clock, realtime=True)
    src.start()
    assert src.read(timeout_s=0.0) is None  # frame 0 is stamped up to 0.5 ms late: not yet
    clock.advance(1.0)
    assert src.read(timeout_s=0.0) is not None
    clock.advance(1000.0)  # a second nobody read: about 29 frames lost
    frame = src.read(timeout_s=0.1)
    assert frame is not None
    assert frame.index == 30
    assert src.counters.frames_dropped == 29
    late = SyntheticSource(world, "top", clock, realtime=True)  # first read 1 s in
    late.start()
    first = late.read(timeout_s=0.1)
    assert first is not None
    assert first.index == 30
    assert late.counters.frames_dropped == 0  # the stream starts at its first read
    bounded = SyntheticSource(world, "top", clock, realtime=False, max_frames=2)
    bounded.read(0.1)
    bounded.read(0.1)
    with pytest.raises(EndOfStream):
        bounded.read(0.1)
