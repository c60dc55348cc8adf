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

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

#: Health file name inside the node's runtime directory (`RuntimeDirectory=`).
HEALTH_FILE_NAME = "health.json"
#: Where the unit's `RuntimeDirectory=conveyor-vision` puts it; the updater's default.
DEFAULT_HEALTH_FILE = Path("/run/conveyor-vision") / HEALTH_FILE_NAME
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


@dataclass(frozen=True, slots=True)
class HealthReport:
    """What the health file says (see `HealthFile`)."""

    version: str
    ready: bool
    healthy: bool
    stalled_stages: tuple[str, ...]
    updated_ms: float
    pid: int


class HealthFile:
    """Writes the node's health as JSON, atomically (temp file + rename), for the updater."""

    def __init__(self, path: Path, version: str) -> None:
        self.path = path
        self.version = version

    def write(self, *, ready: bool, stalled_stages: Sequence[str] = ()) -> None:
        data = {
            "version": self.version,
            "ready": ready,
            "healthy": ready and not stalled_stages,
            "stalled_stages": list(stalled_stages),
            "updated_ms": time.time() * 1000.0,
            "pid": os.getpid(),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(data), encoding="utf-8")
            tmp.chmod(0o644)  # not secret; the updater (another user) reads it
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("health_file_write_failed", path=str(self.path), error=str(exc))
            with contextlib.suppress(OSError):
                tmp.unlink()

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def read_health(path: Path) -> HealthReport | None:
    """Parse a health file; None if it is missing or not a health file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return HealthReport(
            version=str(data["version"]),
            ready=bool(data["ready"]),
            healthy=bool(data["healthy"]),
            stalled_stages=tuple(str(s) for s in data["stalled_stages"]),
            updated_ms=float(data["updated_ms"]),
            pid=int(data["pid"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def health_file_path(state_dir: Path, env: Mapping[str, str] | None = None) -> Path:
    """`$RUNTIME_DIRECTORY/health.json` under systemd, else beside the node's state."""
    environ = os.environ if env is None else env
    runtime = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return Path(runtime or state_dir) / HEALTH_FILE_NAME


class StageHeartbeats:
    """Progress of the pipeline's stages: each calls `beat(name)` every loop round (idle
    rounds too); `stalled()` names those silent for longer than their limit. Its `stalled`
    method is a ready-made health callback for `WatchdogPinger`."""

    def __init__(self, limits_s: Mapping[str, float],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._limits = dict(limits_s)
        self._clock = clock
        now = clock()
        self._last = dict.fromkeys(self._limits, now)
        self._lock = threading.Lock()

    def beat(self, name: str) -> None:
        if name not in self._limits:
            raise KeyError(f"unknown stage {name!r}; known: {', '.join(sorted(self._limits))}")
        now = self._clock()
        with self._lock:
            self._last[name] = now

    def stalled(self) -> tuple[str, ...]:
        now = self._clock()
        with self._lock:
            return tuple(n for n, t in self._last.items() if now - t > self._limits[n])


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
        self._stop = stop or threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_status = ""
        self.pings = 0

    def mark_ready(self) -> None:
        self._ready.set()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("WatchdogPinger already started")
        self._thread = threading.Thread(target=self._run, name="systemd-watchdog", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("watchdog_thread_did_not_stop", timeout_s=timeout_s)

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

    def _run(self) -> None:
        log.info("watchdog_started", interval_s=self.interval_s, watchdog=self.watchdog_enabled)
        while not self._stop.is_set():
            self.tick()
            self._stop.wait(self.interval_s)
