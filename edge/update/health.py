"""Health probes and the health gate that decides whether an update commits.

A probe answers "how is the node doing right now" as a `Probe`: `ready` (it sent
READY=1), `healthy` (nothing has failed), `detail` (why not, for the journal and
the status topic). `ready=False, healthy=True` means still starting; `healthy=False`
means failed, and the gate stops waiting at once.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

from edge.health_file import read_health

log = structlog.get_logger(__name__)

SYSTEMCTL_PROBE_TIMEOUT_S = 10.0  # the slowest probe: `systemctl is-active` on a busy device


@dataclass(frozen=True, slots=True)
class Probe:
    ready: bool
    healthy: bool
    detail: str = ""


class HealthProbe(Protocol):
    def __call__(self) -> Probe: ...


class HealthFileProbe:
    """Reads the node's health file; only a fresh file from `version` counts."""

    def __init__(self, path: Path, version: str, max_age_s: float = 30.0,
                 now_ms: Callable[[], float] | None = None) -> None:
        self.path = path
        self.version = version
        self.max_age_s = max_age_s
        self._now_ms = now_ms or (lambda: time.time() * 1000.0)

    def __call__(self) -> Probe:
        report = read_health(self.path)
        if report is None:
            return Probe(False, True, f"no health file at {self.path} yet")
        if report.version != self.version:
            return Probe(False, True, f"health file is from release {report.version}")
        age_s = (self._now_ms() - report.updated_ms) / 1000.0
        if age_s > self.max_age_s:
            # Stale while starting is normal (old run); stale after READY is a hang.
            return Probe(False, not report.ready,
                         f"health file not updated for {age_s:.0f} s (pid {report.pid})")
        if report.stalled_stages:
            return Probe(report.ready, False,
                         "stalled stages: " + ", ".join(report.stalled_stages))
        if not report.ready:
            return Probe(False, True, "node is starting (not READY yet)")
        return Probe(True, report.healthy, "" if report.healthy else "node reports unhealthy")


class SystemctlProbe:
    """`systemctl is-active UNIT`: 'active' is ready, 'failed' is a failure."""

    def __init__(self, unit: str, systemctl: str = "systemctl") -> None:
        self.unit = unit
        self.systemctl = systemctl

    def __call__(self) -> Probe:
        try:
            out = subprocess.run([self.systemctl, "is-active", self.unit], capture_output=True,
                                 text=True, timeout=SYSTEMCTL_PROBE_TIMEOUT_S,
                                 check=False).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            return Probe(False, True, f"systemctl is-active failed: {exc}")
        if out == "active":
            return Probe(True, True)
        if out in ("activating", "reloading", "deactivating"):
            return Probe(False, True, f"{self.unit} is {out}")
        if out == "failed":
            return Probe(False, False, f"{self.unit} failed (see journalctl -u {self.unit})")
        # 'inactive' between Restart= attempts; StartLimitBurst= turns a loop into 'failed'.
        return Probe(False, True, f"{self.unit} is {out or 'unknown'}")


class AllOf:
    """Ready and healthy only when every probe says so."""

    def __init__(self, probes: Sequence[HealthProbe]) -> None:
        self.probes = tuple(probes)

    def __call__(self) -> Probe:
        results = [p() for p in self.probes]
        return Probe(ready=all(r.ready for r in results),
                     healthy=all(r.healthy for r in results),
                     detail="; ".join(r.detail for r in results if r.detail))


@dataclass(frozen=True, slots=True)
class GatePolicy:
    ready_timeout_s: float = 900.0  # an engine build on a Jetson can take minutes
    healthy_for_s: float = 120.0
    poll_s: float = 2.0

    def longest_wait_s(self, probe_s: float = SYSTEMCTL_PROBE_TIMEOUT_S) -> float:
        """The longest `wait_healthy` runs when a probe takes at most `probe_s`: READY is
        seen at most one poll and probe after `ready_timeout_s`, and the healthy window
        is checked at most one poll and probe after it ends."""
        return self.ready_timeout_s + self.healthy_for_s + 2 * (self.poll_s + probe_s)


@dataclass(frozen=True, slots=True)
class GateResult:
    ok: bool
    reason: str
    waited_s: float


def wait_healthy(probe: HealthProbe, policy: GatePolicy,
                 stop: threading.Event | None = None) -> GateResult:
    """Wait for READY, then require `healthy_for_s` of uninterrupted health."""
    stop = stop or threading.Event()
    start = time.monotonic()
    ready_at: float | None = None
    last = Probe(False, True, "not probed yet")
    while True:
        last = probe()
        now = time.monotonic()
        waited = now - start
        if not last.healthy:
            when = "after READY" if ready_at is not None else "before READY"
            return GateResult(False, f"unhealthy {when} ({waited:.0f} s): {last.detail}", waited)
        if last.ready:
            if ready_at is None:
                ready_at = now
                log.info("update_gate_ready", waited_s=round(waited, 1))
            if now - ready_at >= policy.healthy_for_s:
                return GateResult(True, f"healthy for {now - ready_at:.0f} s after READY", waited)
        elif ready_at is not None:
            return GateResult(False, f"lost READY after {now - ready_at:.0f} s: {last.detail}",
                              waited)
        elif waited >= policy.ready_timeout_s:
            return GateResult(False, f"not READY within {policy.ready_timeout_s:.0f} s: "
                              f"{last.detail}", waited)
        if stop.wait(policy.poll_s):
            return GateResult(False, "interrupted while waiting for health", waited)
