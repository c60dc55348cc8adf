"""RealSense cameras and `.db3`/`.bag` recordings behind the `FrameSource` protocol.

A live camera is opened by serial number through an `rs.pipeline`; a recording
is loaded as a playback device whose sensors feed the SDK's `rs.syncer` (playback
that is not real time then waits for the reader instead of dropping frames,
which the pipeline does not guarantee). Both deliver (depth, colour) pairs
that are aligned to colour with `rs.align` (skipped when the recording is
already aligned), post-processed by the configured filters, and handed on as
`Frame`s whose intrinsics, depth scale and serial come from the device.

Faults: a live camera that stops delivering (USB unplug, "frame didn't
arrive") is re-opened by serial with exponential backoff; after
`RetryPolicy.resets_after` failed attempts the device gets a `hardware_reset`;
after `max_attempts` the source raises `SourceError`. A recording that fails
mid-file is re-opened and fast-forwarded past the last delivered frame.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import structlog

from edge.capture._rs_session import LiveSession, PlaybackSession, Session, intrinsics_of
from edge.capture.buffers import FrameBuffers
from edge.capture.recording import import_realsense
from edge.capture.source import EndOfStream, SourceCounters, SourceError
from edge.config import DepthFilters
from edge.types import Frame, Intrinsics

if TYPE_CHECKING:
    from collections.abc import Callable

    from edge.config import CameraConfig

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard a source tries to get a lost camera back."""

    timeouts_before_reconnect: int = 3  # consecutive empty waits that mean "device lost"
    backoff_initial_s: float = 0.25
    backoff_max_s: float = 8.0
    resets_after: int = 4  # failed re-opens before a hardware_reset
    max_attempts: int = 12  # failed re-opens before giving up (SourceError)


#: How long the capture thread waits for a dropped session to close. `pipeline.stop()` can
#: hang in the SDK on a device that was just unplugged (librealsense#9184): past this, the
#: close finishes (or hangs) on its own thread while capture goes on re-opening.
SESSION_CLOSE_WAIT_S = 2.0


class RealSenseSource:
    """A RealSense camera by serial, or a recording played back through pyrealsense2."""

    def __init__(self, camera_id: str, *, serial: str | None = None,
                 recording: Path | None = None, width: int = 640, height: int = 480,
                 fps: int = 30, filters: DepthFilters | None = None,
                 sync_mode: str = "default", realtime: bool = False,
                 skew_tolerance_ms: float | None = None, retry: RetryPolicy | None = None,
                 on_device_change: Callable[[str, bool], None] | None = None) -> None:
        if (serial is None) == (recording is None):
            raise SourceError(f"camera {camera_id!r}: give exactly one of serial or recording")
        self._camera_id = camera_id
        self.serial = serial
        self.recording = recording
        self.size = (width, height)
        self.fps = fps
        self.filters = filters or DepthFilters()
        self.sync_mode = sync_mode
        self.realtime = realtime
        self.skew_tolerance_ms = skew_tolerance_ms if skew_tolerance_ms is not None else (
            500.0 / fps)
        self.retry = retry or RetryPolicy()
        self.on_device_change = on_device_change
        self._counters = SourceCounters()
        self._buffers = FrameBuffers()
        self._rs: Any = None
        self._session: Session | None = None
        # Guards taking `_session` out (capture thread, stop() from another thread): whoever
        # takes a session closes it, so each one is closed exactly once.
        self._session_lock = threading.Lock()
        self._blocks: list[Any] = []
        self._align: Any = None
        self._lost = threading.Event()  # set by the device-change callback
        self._stop = threading.Event()
        self._empty_waits = 0
        self._failed_opens = 0  # re-opens since the last frame that failed or sent nothing
        self._frame_since_open = False  # the session (re-)opened last has delivered a frame
        self._resets = 0
        self._next_attempt = 0.0
        self._last_ts: float | None = None
        self._last_index: int | None = None
        self._domain_logged = False
        self._context: Any = None

    @classmethod
    def from_config(cls, cfg: CameraConfig, *, retry: RetryPolicy | None = None
                    ) -> RealSenseSource:
        return cls(cfg.id, serial=cfg.serial if cfg.source == "realsense" else None,
                   recording=cfg.recording if cfg.source == "recording" else None,
                   width=cfg.width, height=cfg.height, fps=cfg.fps, filters=cfg.filters,
                   sync_mode=cfg.sync_mode, realtime=cfg.realtime, retry=retry)

    @property
    def camera_id(self) -> str:
        return self._camera_id

    @property
    def counters(self) -> SourceCounters:
        return self._counters

    @property
    def what(self) -> str:
        return f"recording {self.recording}" if self.recording else f"camera {self.serial}"

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Open the device or recording; raises `SourceError` naming it and the problem."""
        self._rs = import_realsense()
        if self.recording is not None:
            self._check_recording_file(self.recording)
        else:
            self._context = self._rs.context()
            self._context.set_devices_changed_callback(self._devices_changed)
        self._stop.clear()
        self._build_blocks()
        self._frame_since_open = False
        self._close_session()  # started again without stop(): the old session goes
        if self.recording is not None:
            self._install(self._open())  # bad files are errors, not faults to retry
            return
        try:
            self._install(self._open())
        except RuntimeError as exc:  # not plugged in (yet): read() keeps trying
            log.warning("camera_unavailable", camera=self.camera_id, serial=self.serial,
                        error=str(exc))
            self._lost.set()

    def stop(self) -> None:
        self._stop.set()
        self._close_session()

    def _install(self, session: Session) -> None:
        """Make `session` the one read from; one opened after stop() is closed instead (the
        capture thread may be re-opening while another thread stops the source)."""
        with self._session_lock:
            if not self._stop.is_set():
                self._session = session
                return
        self._close(session)

    def _close_session(self) -> bool:
        """Drop the current session and close it; False when there was none."""
        with self._session_lock:
            session, self._session = self._session, None
        if session is None:
            return False
        self._close(session)
        return True

    def _close(self, session: Session) -> None:
        """Close on a helper thread, waiting at most SESSION_CLOSE_WAIT_S for it."""
        closer = threading.Thread(target=self._close_quietly, args=(session,), daemon=True,
                                  name=f"rs-close-{self.camera_id}")
        closer.start()
        closer.join(SESSION_CLOSE_WAIT_S)
        if closer.is_alive():
            log.warning("camera_close_slow", camera=self.camera_id, source=self.what,
                        waited_s=SESSION_CLOSE_WAIT_S)

    def _close_quietly(self, session: Session) -> None:
        try:
            session.close()
        except Exception as exc:  # a session that will not close is gone either way
            log.warning("camera_close_failed", camera=self.camera_id, source=self.what,
                        error=f"{type(exc).__name__}: {exc}")

    def _open(self) -> Session:
        if self.recording is not None:
            return PlaybackSession(self._rs, self.recording, realtime=self.realtime,
                                   expect_size=self.size)
        assert self.serial is not None
        return LiveSession(self._rs, self._context, self.serial, self.size, self.fps,
                           self.sync_mode)

    def _check_recording_file(self, path: Path) -> None:
        if not path.is_file():
            raise SourceError(f"recording {path} does not exist (camera {self.camera_id!r})")
        if path.stat().st_size == 0:
            raise SourceError(f"recording {path} is empty (camera {self.camera_id!r})")

    def _build_blocks(self) -> None:
        rs, f = self._rs, self.filters
        self._blocks = []
        if f.decimation > 1:
            dec = rs.decimation_filter()
            dec.set_option(rs.option.filter_magnitude, float(f.decimation))
            self._blocks.append(dec)
        if f.spatial:
            self._blocks.append(rs.spatial_filter())
        if f.temporal:
            self._blocks.append(rs.temporal_filter())
        if f.hole_filling:
            self._blocks.append(rs.hole_filling_filter())
        self._align = rs.align(rs.stream.color)

    def _devices_changed(self, event: Any) -> None:
        """pyrealsense2's device-change callback (runs on an SDK thread)."""
        for dev in event.get_new_devices():
            if dev.get_info(self._rs.camera_info.serial_number) == self.serial:
                log.info("camera_connected", camera=self.camera_id, serial=self.serial)
                self._next_attempt = 0.0  # try right away
                if self.on_device_change is not None:
                    self.on_device_change(self.camera_id, True)
        session = self._session
        if session is not None and session.removed_by(event):
            # Only flagged here (an SDK thread): the capture thread closes the session.
            log.warning("camera_removed", camera=self.camera_id, serial=self.serial)
            self._lost.set()
            if self.on_device_change is not None:
                self.on_device_change(self.camera_id, False)

    # -- reading -------------------------------------------------------------------------

    def read(self, timeout_s: float) -> Frame | None:
        """The next frame; None on timeout; `EndOfStream` at the end of a recording."""
        if self._rs is None:
            raise SourceError(f"{self.what}: read() before start()")
        deadline = time.monotonic() + timeout_s
        while not self._stop.is_set():
            session = self._session
            if session is None or self._lost.is_set():
                # Removed (the device-change callback set `_lost`): closed before re-opening,
                # or its pipeline would keep its threads and USB handles.
                self._close_session()
                if not self._reconnect(deadline):
                    return None
                continue
            remaining = deadline - time.monotonic()
            try:
                pair = session.wait(max(1, int(remaining * 1000)))
            except EndOfStream:
                raise
            except (RuntimeError, SourceError) as exc:
                self._session_failed(f"{type(exc).__name__}: {exc}")
                continue
            if pair is None:
                self._counters.timeouts += 1
                self._empty_waits += 1
                if self._empty_waits >= self.retry.timeouts_before_reconnect:
                    self._session_failed("no frames")
                return None
            self._empty_waits = 0
            frame = self._to_frame(session, *pair)
            if frame is not None:
                self._frame_since_open = True
                self._failed_opens = 0
                return frame
            if time.monotonic() >= deadline:
                return None
        return None

    def _session_failed(self, why: str) -> None:
        log.warning("camera_lost", camera=self.camera_id, source=self.what, reason=why)
        self._lost.set()
        # Opened, then failed before a single frame (no frames, or an error): wedged, not
        # back. Counts as a failed re-open, with its backoff and escalation.
        if self._close_session() and not self._frame_since_open:
            self._reopen_failed(f"opened but sent no frames ({why})")

    def _reconnect(self, deadline: float) -> bool:
        """Try to re-open when the backoff allows; False when `deadline` came first."""
        now = time.monotonic()
        if now < self._next_attempt:
            self._stop.wait(max(0.0, min(self._next_attempt, deadline) - now))
            if time.monotonic() < self._next_attempt:
                return False
        try:
            self._install(self._open())
        except (RuntimeError, SourceError) as exc:
            self._reopen_failed(str(exc))
            return time.monotonic() < deadline
        self._counters.reconnects += 1
        # Only a frame proves the camera back: one that opens and then streams nothing
        # counts as a failed re-open (backoff, hardware reset, in the end SourceError).
        self._frame_since_open = False
        self._empty_waits = 0
        self._lost.clear()
        log.info("camera_reopened", camera=self.camera_id, source=self.what,
                 reconnects=self._counters.reconnects)
        return True

    def _reopen_failed(self, why: str) -> None:
        """One more failed re-open: back off, reset the camera every `resets_after`, give up
        after `max_attempts` (SourceError)."""
        self._failed_opens += 1
        if self._failed_opens >= self.retry.max_attempts:
            raise SourceError(f"{self.what} (camera {self.camera_id!r}) is gone: "
                              f"{self._failed_opens} re-opens failed; last error: {why}")
        if self._failed_opens % self.retry.resets_after == 0:
            self._hardware_reset()
        delay = min(self.retry.backoff_max_s,
                    self.retry.backoff_initial_s * 2 ** (self._failed_opens - 1))
        self._next_attempt = time.monotonic() + delay
        log.warning("camera_reopen_failed", camera=self.camera_id, attempt=self._failed_opens,
                    retry_in_s=delay, error=why)

    def _hardware_reset(self) -> None:
        """Reset the camera by serial (live only): the SDK's cure for a wedged USB device."""
        self._resets += 1
        if self.serial is None or self._context is None:
            return
        for dev in self._context.query_devices():
            if dev.get_info(self._rs.camera_info.serial_number) == self.serial:
                log.warning("camera_hardware_reset", camera=self.camera_id, serial=self.serial)
                dev.hardware_reset()
                return
        log.warning("camera_not_enumerated", camera=self.camera_id, serial=self.serial)

    # -- conversion ----------------------------------------------------------------------

    def _to_frame(self, session: Session, depth: Any, color: Any) -> Frame | None:
        ts = float(color.get_timestamp())
        if self._last_ts is not None and ts <= self._last_ts:
            return None  # replayed after a re-open, or a duplicate
        self._log_domain(color)
        if abs(float(depth.get_timestamp()) - ts) > self.skew_tolerance_ms:
            self._counters.skewed_frames += 1
        if session.needs_align:
            aligned = self._align.process(session.composite(depth, color))
            depth = aligned.get_depth_frame()
        for block in self._blocks:
            depth = block.process(depth)
        index = int(color.get_frame_number())
        if self._last_index is not None and index > self._last_index + 1:
            self._counters.frames_dropped += index - self._last_index - 1
        self._last_index, self._last_ts = index, ts
        # Copied out (holding SDK buffers starves its frame pool and stalls the stream) into
        # buffers of our own pool, reused once the pipeline lets go of a frame.
        depth_np = self._buffers.copy_of(np.asanyarray(depth.get_data()))
        color_src = np.asanyarray(color.get_data())
        if session.color_is_rgb:
            color_np = self._buffers.take(color_src.shape, np.uint8)
            cv2.cvtColor(color_src, cv2.COLOR_RGB2BGR, dst=color_np)
        else:
            color_np = self._buffers.copy_of(color_src)
        intr = session.color_intrinsics
        if depth_np.shape != color_np.shape[:2]:
            factor = depth_np.shape[1] / color_np.shape[1]
            intr = dataclasses.replace(intr.scaled(factor), width=depth_np.shape[1],
                                       height=depth_np.shape[0])
            color_np = cv2.resize(color_np, (depth_np.shape[1], depth_np.shape[0]),
                                  interpolation=cv2.INTER_AREA)
        self._counters.frames_received += 1
        self._counters.buffers_allocated = self._buffers.allocated
        return Frame(camera_id=self.camera_id, index=index, timestamp_ms=ts,
                     color=color_np, depth=depth_np,
                     depth_scale_m=session.depth_scale_m, intrinsics=intr)

    def _log_domain(self, color: Any) -> None:
        if self._domain_logged:
            return
        self._domain_logged = True
        domain = color.get_frame_timestamp_domain()
        if domain == self._rs.timestamp_domain.global_time:
            log.info("camera_timestamp_domain", camera=self.camera_id, domain="global_time")
        else:
            log.warning("camera_timestamp_domain", camera=self.camera_id, domain=str(domain),
                        hint="no frame metadata: timestamps fall back to host arrival time; "
                        "install the kernel patches or the RSUSB backend for global time")

    @property
    def intrinsics(self) -> Intrinsics:
        """Colour intrinsics as delivered (after decimation)."""
        if self._session is None:
            raise SourceError(f"{self.what}: not started")
        intr = self._session.color_intrinsics
        if self.filters.decimation > 1:
            intr = intr.scaled(1.0 / self.filters.decimation)
        return intr

    @property
    def frame_buffers(self) -> FrameBuffers:
        """Where captured colour and depth images are copied to (see `edge.capture.buffers`)."""
        return self._buffers

    @property
    def resets(self) -> int:
        """hardware_reset escalations so far."""
        return self._resets

__all__ = ["RealSenseSource", "RetryPolicy", "intrinsics_of"]
