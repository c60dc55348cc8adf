"""Measured item boxes (edge.perception.crops.measure_box): true size, centre and yaw."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.perception.crops import measure_box
from tests.perception.helpers import CFG, render_boxes, segmenter


@settings(max_examples=25, deadline=None)
@given(length=st.floats(150, 320), aspect=st.floats(0.45, 1.0), height=st.floats(30, 160),
       yaw=st.floats(-0.7, 0.7), x=st.floats(-150, 150), y=st.floats(-100, 100))
def test_measured_box_matches_the_true_box(length: float, aspect: float, height: float,
                                           yaw: float, x: float, y: float) -> None:
    """Any box in view: length, width within 6 mm (about 1.5 px), height within 2 mm, centre
    within 4 mm, one detection, not merged."""
    width = length * aspect
    dets = segmenter().detect(render_boxes([(x, y, yaw, length, width, height)]))
    assert len(dets) == 1
    d = dets[0]
    assert not d.merged
    assert d.complete
    assert d.box_mm[0] == pytest.approx(max(length, width), abs=6.0)
    assert d.box_mm[1] == pytest.approx(min(length, width), abs=6.0)
    assert d.box_mm[2] == pytest.approx(height, abs=2.0)
    assert d.centre_mm[0] == pytest.approx(x, abs=4.0)
    assert d.centre_mm[1] == pytest.approx(y, abs=4.0)


@settings(max_examples=15, deadline=None)
@given(length=st.floats(150, 320), aspect=st.floats(0.45, 1.0), yaw=st.floats(-0.7, 0.7),
       x=st.floats(-150, 150), y=st.floats(-100, 100))
def test_a_box_measured_from_its_bounding_box_equals_the_whole_frame_measure(
        length: float, aspect: float, yaw: float, x: float, y: float) -> None:
    """The segmenter measures each item over its bounding box only (cost follows the item,
    not the frame): the same box, centre and yaw to the last bit as from a frame-sized mask."""
    frame = render_boxes([(x, y, yaw, length, length * aspect, 80.0)])
    seg = segmenter()
    heights = seg.plane.height_map(frame.depth, frame.depth_scale_m)
    mask = heights > CFG.items.min_height_mm
    rows, cols = np.nonzero(mask)
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    whole = measure_box(seg.plane, frame.depth, frame.depth_scale_m, mask)
    part = measure_box(seg.plane, frame.depth, frame.depth_scale_m, mask[y0:y1, x0:x1],
                       (int(x0), int(y0)))
    assert part == whole
    assert whole[0][0] == pytest.approx(max(length, length * aspect), abs=6.0)
