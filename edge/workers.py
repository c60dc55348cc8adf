"""The one lifecycle of every background thread in the node.

`start()` creates and starts the thread (so an object can be built, inspected and thrown
away without a thread); `stop(timeout_s)` sets the stop event, wakes the thread if it waits
on something other than the event, joins, and warns when the thread is stuck. Stopping twice,
or a worker never started, is harmless.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)


class WorkerThread:
    """A named daemon thread that runs `target(stop_event)` until the event is set.

    `wake` is called after the event is set, for a target blocked elsewhere (a queue's
    `get`, a condition). `stop_event` may be shared with other workers (a node's stages stop
    together); by default each worker has its own.
    """

    def __init__(self, name: str, target: Callable[[threading.Event], None], *,
                 stop_event: threading.Event | None = None,
                 wake: Callable[[], None] | None = None) -> None:
        self.name = name
        self.stop_event = stop_event if stop_event is not None else threading.Event()
        self._target = target
        self._wake = wake
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"worker {self.name!r} already started")
        self._thread = threading.Thread(target=self._target, args=(self.stop_event,),
                                        name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> bool:
        """Stop and join; False (and a warning) when the thread is still running after
        `timeout_s`."""
        self.stop_event.set()
        if self._wake is not None:
            self._wake()
        return self.join(timeout_s)

    def join(self, timeout_s: float) -> bool:
        """Wait for the thread to end (after the event was set elsewhere); False and a
        warning when it is still running after `timeout_s`."""
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("worker_did_not_stop", worker=self.name, timeout_s=timeout_s)
            return False
        return True

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
