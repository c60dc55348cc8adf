"""Bounded queues between stages: backpressure, and what happens to a value at shutdown."""

from __future__ import annotations

import threading
import time

from edge.pipeline.stage_thread import BoundedQueue


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
