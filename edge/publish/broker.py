"""An embedded Mosquitto broker on a free loopback port, for tests and ``edge-node demo``.

Runs Debian's ``mosquitto`` binary from a config generated into a private
directory. `restart` reuses the port, so clients reconnect to the same URL;
`kill` is a SIGKILL (a crash, not a clean shutdown). With ``persistence=True``
sessions and queued messages are saved to disk every second, as a production
broker would, so a restarted broker still knows durable subscribers.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)


class BrokerError(RuntimeError):
    """Mosquitto could not be started (the message carries its log)."""


@dataclass(frozen=True, slots=True)
class BrokerTls:
    """A TLS listener: the broker's certificate and the CA that signs client certificates."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    require_client_cert: bool = True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MosquittoBroker:
    """A private mosquitto process bound to 127.0.0.1 only."""

    def __init__(self, workdir: Path | None = None, *, port: int | None = None,
                 tls: BrokerTls | None = None, persistence: bool = False,
                 extra_config: str = "", binary: str = "mosquitto") -> None:
        exe = shutil.which(binary)
        if exe is None:
            raise BrokerError(f"{binary!r} not found; install Debian's mosquitto package")
        self._exe = exe
        self._own_dir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="cv-mosquitto-")) if workdir is None \
            else workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.tls = tls
        self.persistence = persistence
        self.extra_config = extra_config
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def config_text(self) -> str:
        lines = [
            "per_listener_settings false",
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            f"log_dest file {self.log_path}",
            "log_type error", "log_type warning", "log_type notice", "log_type information",
            "connection_messages true",
            "max_queued_messages 100000",
            "max_inflight_messages 100",
            "user root",
        ]
        if self.persistence:
            lines += ["persistence true", f"persistence_location {self.workdir}/",
                      "autosave_interval 1", "autosave_on_changes false"]
        else:
            lines.append("persistence false")
        if self.tls is not None:
            lines += [f"cafile {self.tls.ca_file}", f"certfile {self.tls.cert_file}",
                      f"keyfile {self.tls.key_file}", "tls_version tlsv1.2",
                      f"require_certificate {str(self.tls.require_client_cert).lower()}"]
        if self.extra_config:
            lines.append(self.extra_config.strip())
        return "\n".join(lines) + "\n"

    def start(self, timeout_s: float = 5.0) -> None:
        if self.running:
            return
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self.config_text(), encoding="utf-8")
        # Debian's mosquitto speaks sd_notify itself: it must not answer for the node.
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        self._proc = subprocess.Popen([self._exe, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, env=env)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr \
                    else ""
                raise BrokerError(f"mosquitto exited ({self._proc.returncode}): {err.strip()} "
                                  f"{self._log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    log.debug("broker.started", port=self.port, pid=self._proc.pid)
                    return
            except OSError:
                time.sleep(0.02)
        self.kill()
        raise BrokerError(f"mosquitto did not listen on port {self.port} within {timeout_s} s "
                          f"{self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return "log: " + " | ".join(self.log_path.read_text().splitlines()[-5:])
        except OSError:
            return ""

    def _end(self, sig: signal.Signals) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(sig)
            try:
                self._proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5.0)
        if self._proc.stderr is not None:
            self._proc.stderr.close()
        self._proc = None

    def stop(self) -> None:
        """A clean shutdown (SIGTERM): the broker saves its state if persistent."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """A crash (SIGKILL): nothing is saved beyond the last autosave."""
        self._end(signal.SIGKILL)

    def restart(self, *, kill: bool = True) -> None:
        """Kill (or stop) and start again on the same port."""
        (self.kill if kill else self.stop)()
        self.start()

    def close(self) -> None:
        """Stop and remove the private directory (if this object created it)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
