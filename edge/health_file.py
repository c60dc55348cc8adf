"""The node's health file: what the service writes and the updater's health gate reads.

It lives below both (the service in `edge.app`, the gate in `edge.update`) so that neither
imports the other for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from edge.durable import write_atomic

log = structlog.get_logger(__name__)

#: Health file name inside the node's runtime directory (`RuntimeDirectory=`).
HEALTH_FILE_NAME = "health.json"
#: Where the unit's `RuntimeDirectory=conveyor-vision` puts it; the updater's default.
DEFAULT_HEALTH_FILE = Path("/run/conveyor-vision") / HEALTH_FILE_NAME


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
    """Writes the node's health as JSON, atomically, for the updater."""

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
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # not secret: the updater (another user) reads it
            write_atomic(self.path, json.dumps(data), mode=0o644)
        except OSError as exc:
            log.warning("health_file_write_failed", path=str(self.path), error=str(exc))

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
