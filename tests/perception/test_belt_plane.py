"""Belt-plane geometry: the integer depth window the item finder thresholds with."""

from __future__ import annotations

import copy

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.perception.belt_plane import BeltPlane
from edge.sim.conveyor import default_intrinsics
from edge.types import Pose

ALL_DEPTHS = np.arange(1 << 16, dtype=np.uint16)


def _plane(eye_height: float, tilt: float) -> BeltPlane:
    # Small images keep the brute force below cheap; tilts up to past the horizon give
    # pixels whose rays are level with the belt or rise away from it.
    eye = np.array([0.0, 0.0, eye_height])
    target = eye + np.array([np.sin(tilt), 0.0, -np.cos(tilt)])
    # Image "up" towards the sky, so that tilting sweeps the image rows over the horizon.
    return BeltPlane(default_intrinsics(64, 48), Pose.look_at(eye, target, np.array([0, 0, 1.0])))


@settings(max_examples=25, deadline=None)
@given(eye_height=st.floats(300.0, 2500.0), tilt=st.floats(0.0, 1.7),
       scale=st.sampled_from([0.001, 0.0001, 0.000125, 0.0025]),
       min_height=st.floats(0.0, 400.0), row=st.integers(0, 47))
def test_depth_window_holds_exactly_the_depths_standing_above_min_height(
        eye_height: float, tilt: float, scale: float, min_height: float, row: int) -> None:
    """Every raw depth value of a row of pixels: the window is the height map's threshold,
    bit for bit (the item finder depends on finding the same pixels as before)."""
    plane = _plane(eye_height, tilt)
    lo, hi = plane.item_depth_window(scale, min_height)
    depth = np.ascontiguousarray(np.broadcast_to(ALL_DEPTHS[:, None], (1 << 16, 64)))
    # Every depth value at every pixel of the row: the plane's height map over an image of
    # 65536 copies of that row.
    rows_plane = copy.copy(plane)
    rows_plane._rays_z = np.ascontiguousarray(np.broadcast_to(plane._rays_z[row], depth.shape))
    with np.errstate(invalid="ignore"):
        want = rows_plane.height_map(depth, scale) > np.float32(min_height)
    got = (depth >= lo[row]) & (depth <= hi[row])
    assert np.array_equal(got, want)


def test_rays_above_the_horizon_have_open_ended_windows_and_unreachable_heights_none() -> None:
    """A camera looking level: rays that rise away from the belt stand above it from some
    depth on (to the largest raw depth); rays that fall from 1 m, or rise too slowly, never
    reach 5 m, and an empty window is lo=1, hi=0, which no raw depth falls in."""
    plane = _plane(1000.0, np.pi / 2)
    rising = plane._rays_z >= 0
    assert rising.any()
    assert not rising.all()
    lo, hi = plane.item_depth_window(0.001, 20.0)
    assert (hi[rising] == 65535).all()
    assert (lo[rising] == 1).all()
    lo, hi = plane.item_depth_window(0.001, 5000.0)
    assert ((lo[~rising] == 1) & (hi[~rising] == 0)).all()
    empty = (lo == 1) & (hi == 0)
    reached = rising & ~empty  # rays steep enough to climb 4 m within 65.535 m
    assert reached.any()
    assert empty[rising].any()
    assert (hi[reached] == 65535).all()
    assert (lo[reached] > 1).all()


def test_height_map_of_a_region_is_that_region_of_the_whole_map() -> None:
    plane = _plane(900.0, 0.4)
    rng = np.random.default_rng(3)
    depth = rng.integers(0, 1500, (48, 64), dtype=np.uint16)
    whole = plane.height_map(depth, 0.001)
    part = plane.height_map(depth, 0.001, roi=(5, 7, 40, 30))
    np.testing.assert_array_equal(part, whole[7:30, 5:40])
