"""The node's side of systemd: sd_notify, a health-gated watchdog, and a health file.

`SystemdNotifier` speaks the notify protocol (one datagram of `KEY=VALUE` lines to
the AF_UNIX socket named by `$NOTIFY_SOCKET`; a leading '@' means the abstract
namespace). Without `$NOTIFY_SOCKET` (not started by systemd, or `Type=` is not
notify) every call is a no-op that returns False.

`WatchdogPinger` sends `WATCHDOG=1` every WatchdogSec/2 *only while* the health
callback reports no stalled stage, so a wedged stage stops the pings and systemd
kills and restarts the node. It also keeps `STATUS=` and the `HealthFile` (read by
the updater's health-gated commit) up to date.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import structlog

from edge.health_file import HealthFile
from edge.workers import WorkerThread

log = structlog.get_logger(__name__)

#: Without a watchdog, the pinger still refreshes STATUS= and the health file this often.
DEFAULT_STATUS_INTERVAL_S = 5.0

StalledStages = Callable[[], Sequence[str]]


def notify_address(value: str) -> str | bytes | None:
    """The socket address for a `$NOTIFY_SOCKET` value ('@name' is abstract); None if unusable."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock (`vsock:CID:PORT`) and relative paths are not for this node


class SystemdNotifier:
    """sd_notify over `$NOTIFY_SOCKET`; every method is a no-op (returns False) without one."""

    def __init__(self, socket_path: str | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        environ = os.environ if env is None else env
        raw = socket_path if socket_path is not None else environ.get("NOTIFY_SOCKET", "")
        self._address = notify_address(raw)
        if raw and self._address is None:
            log.warning("sd_notify_unsupported_socket", notify_socket=raw)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """True when messages actually go to systemd."""
        return self._address is not None

    def notify(self, message: str) -> bool:
        """Send one raw message (newline-separated `KEY=VALUE` lines); True if it was sent."""
        if self._address is None:
            return False
        with self._lock:
            try:
                if self._sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    sock.setblocking(False)  # never stall a stage on a slow manager
                    self._sock = sock
                self._sock.sendto(message.encode(), self._address)
            except OSError as exc:
                log.warning("sd_notify_failed", error=str(exc), message=message.partition("\n")[0])
                return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1: models loaded, broker connected, every camera streams."""
        return self.notify("READY=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))

    def watchdog(self) -> bool:
        """WATCHDOG=1: keep-alive ping."""
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """STATUS=: one line shown by `systemctl status`."""
        return self.notify(f"STATUS={_one_line(text)}")

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: shutdown has begun."""
        return self.notify("STOPPING=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))

    def reloading(self) -> bool:
        """RELOADING=1 with MONOTONIC_USEC (systemd >= 253 requires it); send ready() after."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def extend_timeout(self, usec: int, status: str | None = None) -> bool:
        """EXTEND_TIMEOUT_USEC=: give start-up (e.g. an engine build) `usec` more from now."""
        if usec <= 0:
            raise ValueError(f"extend_timeout: usec must be > 0, got {usec}")
        extra = f"\nSTATUS={_one_line(status)}" if status else ""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(usec)}{extra}")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _one_line(text: str) -> str:
    return " ".join(text.split())[:200]


def watchdog_interval_s(env: Mapping[str, str] | None = None,
                        pid: int | None = None) -> float | None:
    """Seconds between pings (WatchdogSec/2), or None when this process has no watchdog.

    `$WATCHDOG_PID`, when set, must name this process (it is for the main PID only).
    """
    environ = os.environ if env is None else env
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner:
        try:
            if int(owner) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 1e6 / 2.0


class WatchdogPinger:
    """Pings the watchdog only while no stage is stalled; keeps STATUS= and the health file.

    `stalled_stages()` returns the names of stages that stopped making progress (empty:
    healthy); an exception from it counts as a stall. `summary()` gives the one-line
    STATUS= text. `ready` is whether the node has already sent READY=1 (the health
    file reports it); call `mark_ready()` when it does.
    """

    def __init__(
        self,
        notifier: SystemdNotifier,
        stalled_stages: StalledStages,
        *,
        summary: Callable[[], str] | None = None,
        health_file: HealthFile | None = None,
        interval_s: float | None = None,
        env: Mapping[str, str] | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self._notifier = notifier
        self._stalled_stages = stalled_stages
        self._summary = summary
        self._health_file = health_file
        watchdog = watchdog_interval_s(env)
        self.watchdog_enabled = watchdog is not None and notifier.enabled
        self.interval_s = interval_s or watchdog or DEFAULT_STATUS_INTERVAL_S
        self._ready = threading.Event()
        self._worker = WorkerThread("systemd-watchdog", self._run, stop_event=stop)
        self._last_status = ""
        self.pings = 0

    def mark_ready(self) -> None:
        self._ready.set()

    def start(self) -> None:
        self._worker.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._worker.stop(timeout_s)

    def tick(self) -> tuple[str, ...]:
        """One round: check health, ping if healthy, refresh STATUS and the health file."""
        try:
            stalled = tuple(self._stalled_stages())
        except Exception as exc:  # a broken health check must not look healthy
            log.error("health_check_failed", error=repr(exc))
            stalled = ("health-check",)
        if not stalled and self.watchdog_enabled and self._notifier.watchdog():
            self.pings += 1
        status = self._status_line(stalled)
        if status != self._last_status:
            self._notifier.status(status)
            if stalled and not self._last_status.startswith("STALLED"):
                log.error("stages_stalled", stalled=list(stalled), watchdog_pings_stopped=True)
            self._last_status = status
        if self._health_file is not None:
            self._health_file.write(ready=self._ready.is_set(), stalled_stages=stalled)
        return stalled

    def _status_line(self, stalled: Sequence[str]) -> str:
        if stalled:
            return "STALLED: " + ", ".join(stalled)
        if self._summary is None:
            return "running" if self._ready.is_set() else "starting"
        try:
            return _one_line(self._summary())
        except Exception as exc:
            return f"status unavailable: {exc!r}"

    def _run(self, stop: threading.Event) -> None:
        log.info("watchdog_started", interval_s=self.interval_s, watchdog=self.watchdog_enabled)
        while not stop.is_set():
            self.tick()
            stop.wait(self.interval_s)
