"""Bounded queues between stages: backpressure, and what happens to a value at shutdown."""

from __future__ import annotations

import threading
import time

import pytest

from edge.pipeline.stage_thread import BoundedQueue, StageStats


def test_put_waits_while_full_and_gives_up_when_the_node_stops() -> None:
    q: BoundedQueue[int] = BoundedQueue("q", 1)
    stop = threading.Event()
    assert q.put(1, stop)
    threading.Timer(0.2, stop.set).start()
    t0 = time.monotonic()
    assert not q.put(2, stop)  # full until the stop: refused, not lost silently
    assert 0.15 < time.monotonic() - t0 < 2.0
    assert q.get_nowait() == 1


def test_a_value_that_fits_still_goes_in_after_the_stop() -> None:
    """A stage caught mid-step by the stop hands its result on if there is room: the shutdown
    empties the queues and inspects what is in them."""
    q: BoundedQueue[int] = BoundedQueue("q", 2)
    stop = threading.Event()
    stop.set()
    assert q.put(1, stop)
    assert q.put(2, stop)
    assert not q.put(3, stop)
    assert [q.get_nowait(), q.get_nowait(), q.get_nowait()] == [1, 2, None]


def test_errors_far_apart_are_separate_incidents_not_a_failing_stage(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two bad items minutes apart on a quiet belt never make a failing stage; steps that
    keep raising for longer than the window do, until a step works again."""
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    stats = StageStats("inference", failing_window_s=10.0)
    stats.error()
    now[0] += 300.0
    stats.error()
    now[0] += 5.0
    assert stats.failing_for_s(10.0) == 5.0
    for _ in range(4):  # every 3 s, for 12 s
        now[0] += 3.0
        stats.error()
    assert stats.failing_for_s(10.0) == 17.0
    stats.observe(0.01)
    assert stats.failing_for_s(10.0) == 0.0
