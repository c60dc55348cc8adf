"""Drawing the live view: where items land in a camera image (no node needed)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.config import is_loopback
from edge.perception.belt_plane import BeltPlane
from edge.sim.conveyor import default_intrinsics, default_pose
from edge.types import Decision, Frame
from edge.web.live import LiveItem, LiveTrack, annotate, footprint_rect

PLANE = BeltPlane(default_intrinsics(640, 480), default_pose(0))


def _project(x: float, y: float, z: float) -> tuple[float, float]:
    p = PLANE.pose.inverse().apply(np.array([[x, y, z]], dtype=np.float64))[0]
    k = PLANE.intrinsics
    return k.fx * p[0] / p[2] + k.cx, k.fy * p[1] / p[2] + k.cy


@settings(max_examples=200, deadline=None)
@given(x=st.floats(-120, 120), y=st.floats(-120, 120), length=st.floats(40, 300),
       width=st.floats(40, 200), height=st.floats(5, 150))
def test_item_box_contains_the_projected_item(x: float, y: float, length: float, width: float,
                                              height: float) -> None:
    """The drawn rectangle contains the projection of the item's top centre when in view."""
    rect = footprint_rect(PLANE, (x, y), (length, width, height))
    u, v = _project(x, y, height)
    k = PLANE.intrinsics
    if rect is None:
        assert not (0 <= u < k.width and 0 <= v < k.height)
        return
    x0, y0, x1, y1 = rect
    if 0 <= u < k.width and 0 <= v < k.height:
        assert x0 - 1 <= u <= x1 + 1
        assert y0 - 1 <= v <= y1 + 1


def test_items_are_drawn_in_their_verdict_colour_where_the_belt_moved_them() -> None:
    """A sidelined item captured 200 ms ago is drawn in red, moved on by the belt."""
    frame = Frame("top", 7, 10_200.0, np.full((480, 640, 3), 90, np.uint8),
                  np.zeros((480, 640), np.uint16), 0.001, PLANE.intrinsics)
    item = LiveItem("ITEM-1", "P", Decision.SIDELINE, ("damage",), 0.9, 10_000.0, 10_050.0,
                    (-100.0, 0.0), (120.0, 80.0, 60.0), "sid", False, False)
    img = annotate(frame, PLANE, [item], speed_mm_per_ms=1.0)  # now at x = +100 mm
    red = (img[..., 2] > 200) & (img[..., 1] < 80) & (img[..., 0] < 80)
    rect = footprint_rect(PLANE, (100.0, 0.0), (120.0, 80.0, 60.0))
    assert rect is not None
    assert red.sum() > 100
    _ys, xs = np.nonzero(red)
    x0, _, x1, _ = rect
    assert x0 - 3 <= np.median(xs) <= x1 + 3
    stale = annotate(frame, PLANE, [item], speed_mm_per_ms=1.0)
    assert np.array_equal(img, stale)  # pure: the frame itself is not drawn on
    assert int(frame.color.std()) == 0


def test_loopback_addresses() -> None:
    """Only loopback binds go without a token."""
    assert is_loopback("127.0.0.1")
    assert is_loopback("::1")
    assert is_loopback("localhost")
    assert is_loopback("127.1.2.3")
    assert not is_loopback("0.0.0.0")
    assert not is_loopback("192.168.1.5")
    assert not is_loopback("node.example")


def test_items_still_tracked_are_drawn_amber_with_their_track_id() -> None:
    """An open track (no verdict yet) is boxed in amber where the belt has carried it."""
    frame = Frame("top", 3, 5_100.0, np.full((480, 640, 3), 90, np.uint8),
                  np.zeros((480, 640), np.uint16), 0.001, PLANE.intrinsics)
    track = LiveTrack(12, (-60.0, 60.0), 0.0, 5_000.0, 80.0, 50.0)
    img = annotate(frame, PLANE, [], speed_mm_per_ms=0.5, tracks=[track])  # now 50 mm on
    amber = (img[..., 2] > 200) & (img[..., 1] > 150) & (img[..., 0] < 60)
    rect = footprint_rect(PLANE, (50.0, 0.0), (120.0, 80.0, 50.0))
    assert rect is not None
    assert amber.sum() > 100
    _, xs = np.nonzero(amber)
    assert rect[0] - 3 <= np.median(xs) <= rect[2] + 3
