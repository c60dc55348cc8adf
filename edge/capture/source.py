"""Frame sources: one interface for RealSense cameras, recordings and the synthetic conveyor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from edge.types import Frame


class SourceError(RuntimeError):
    """A source that cannot deliver frames: names the camera or file and the problem."""


class EndOfStream(SourceError):  # noqa: N818 - an event, not a bug
    """A recording or a bounded synthetic run has no more frames."""


@dataclass(slots=True)
class SourceCounters:
    """What a source reports about itself (exported as metrics)."""

    frames_received: int = 0
    frames_dropped: int = 0
    timeouts: int = 0
    reconnects: int = 0
    skewed_frames: int = 0
    #: frame buffers allocated so far; flat once the pipeline is warm (they are reused)
    buffers_allocated: int = 0


class FrameSource(Protocol):
    """A camera (or stand-in) that yields aligned RGB-D frames.

    `read` blocks at most `timeout_s` and returns None on timeout; it raises
    `EndOfStream` when a finite source is exhausted and `SourceError` when the
    camera is gone for good. Sources recover from transient faults themselves.
    """

    @property
    def camera_id(self) -> str: ...

    @property
    def counters(self) -> SourceCounters: ...

    def start(self) -> None: ...

    def read(self, timeout_s: float) -> Frame | None: ...

    def stop(self) -> None: ...
