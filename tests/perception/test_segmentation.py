"""Item segmentation: touching items split by height or flagged merged; noise is no item."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edge.sim.conveyor import default_intrinsics
from edge.types import Frame
from tests.perception.helpers import render_boxes, segmenter


def test_touching_items_of_different_heights_are_split() -> None:
    """Two touching boxes, 100 and 150 mm high: two detections with their own boxes."""
    frame = render_boxes([(-120.0, 0.0, 0.1, 240.0, 180.0, 100.0),
                          (120.0 + 1.0, 20.0, 0.1, 240.0, 180.0, 150.0)])
    dets = sorted(segmenter().detect(frame), key=lambda d: d.centre_mm[0])
    assert len(dets) == 2
    assert not any(d.merged for d in dets)
    assert [round(d.box_mm[2] / 10) for d in dets] == [10, 15]
    assert all(d.box_mm[0] == pytest.approx(240.0, abs=12.0) for d in dets)


def test_touching_items_of_equal_height_are_marked_merged() -> None:
    """Two touching boxes of the same height give no depth step: one detection, merged."""
    frame = render_boxes([(-120.0, 0.0, 0.0, 240.0, 180.0, 100.0),
                          (120.0, 25.0, 0.0, 240.0, 180.0, 100.0)])
    dets = segmenter().detect(frame)
    assert len(dets) == 1
    assert dets[0].merged


def test_wrong_frame_size_for_the_calibration_is_refused() -> None:
    """A 320x240 frame for a 640x480 calibration raises naming both sizes."""
    seg = segmenter()
    small = Frame("top", 0, 0.0, np.zeros((240, 320, 3), np.uint8),
                  np.zeros((240, 320), np.uint16), 0.001, default_intrinsics(320, 240))
    with pytest.raises(ValueError, match=r"320x240.*640x480"):
        seg.detect(small)


def test_empty_belt_and_noise_give_no_items() -> None:
    """An empty belt with 3 mm depth noise and a few dropouts yields nothing."""
    frame = render_boxes([])
    rng = np.random.default_rng(0)
    noisy = frame.depth.astype(np.float64) + rng.normal(0, 3.0, frame.depth.shape)
    noisy[rng.random(noisy.shape) < 0.01] = 0
    frame = dataclasses.replace(frame, depth=noisy.astype(np.uint16))
    assert segmenter().detect(frame) == []
