"""Node metrics computed at scrape time."""

from __future__ import annotations

import pytest

from edge.pipeline.metrics import RecentRate


def test_camera_rate_is_recent_so_a_camera_that_stopped_shows_zero() -> None:
    """30 fps for an hour, then nothing for 15 s: the rate is 0, not 29.9 (it used to be a
    lifetime average, so a dead camera looked alive on /metrics for hours)."""
    rate = RecentRate(window_s=10.0)
    frames = 0
    for second in range(1, 3601):
        frames += 30
        assert rate.rate(frames, float(second), since_s=0.0) == pytest.approx(30.0)
    for second in range(3601, 3616):
        last = rate.rate(frames, float(second), since_s=0.0)
    assert last == 0.0


def test_early_reads_and_rare_scrapes_use_what_is_there() -> None:
    """Before a window's worth of samples, the rate since counting began; scrapes 15 s
    apart give the rate between them."""
    rate = RecentRate(window_s=10.0)
    assert rate.rate(40, 2.0, since_s=0.0) == pytest.approx(20.0)
    assert rate.rate(340, 17.0, since_s=0.0) == pytest.approx(20.0)
    assert rate.rate(340, 32.0, since_s=0.0) == 0.0
