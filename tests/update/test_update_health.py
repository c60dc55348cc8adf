"""Health probes and the gate: what counts as READY, healthy, starting or failed."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from edge.commands.update import main
from edge.health_file import HealthFile
from edge.update.health import (
    AllOf,
    GatePolicy,
    HealthFileProbe,
    Probe,
    SystemctlProbe,
    wait_healthy,
)
from edge.update.store import ReleaseStore

from .conftest import BundleFactory


def _health(path: Path, **fields: object) -> None:
    data = {"version": "2.0.0", "ready": True, "healthy": True, "stalled_stages": [],
            "updated_ms": time.time() * 1000.0, "pid": 1234}
    data.update(fields)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(("fields", "ready", "healthy", "detail"), [
    ({}, True, True, ""),
    ({"ready": False, "healthy": False}, False, True, "not READY yet"),
    ({"version": "1.0.0"}, False, True, "from release 1.0.0"),
    ({"updated_ms": 0.0}, False, False, "not updated for"),
    ({"updated_ms": 0.0, "ready": False}, False, True, "not updated for"),
    ({"stalled_stages": ["sync"], "healthy": False}, True, False, "stalled stages: sync"),
])
def test_health_file_probe(tmp_path: Path, fields: dict[str, object], ready: bool,
                           healthy: bool, detail: str) -> None:
    """Only a fresh file from the expected release counts; a stale file after READY is a
    hang (failure), before READY it is a previous run (still starting)."""
    path = tmp_path / "health.json"
    _health(path, **fields)
    probe = HealthFileProbe(path, "2.0.0", max_age_s=5)()
    assert (probe.ready, probe.healthy) == (ready, healthy)
    assert detail in probe.detail


def test_missing_health_file_means_starting(tmp_path: Path) -> None:
    """No health file yet (the node has not started) is 'starting', not a failure."""
    probe = HealthFileProbe(tmp_path / "none.json", "2.0.0")()
    assert probe == Probe(False, True, f"no health file at {tmp_path / 'none.json'} yet")


def test_gate_requires_uninterrupted_health_after_ready() -> None:
    """The gate passes only after healthy_for seconds of READY; losing READY fails it."""
    states = iter([Probe(False, True, "starting")] * 2 + [Probe(True, True)] * 3
                  + [Probe(False, True, "restarting")] * 50)
    result = wait_healthy(lambda: next(states), GatePolicy(5.0, 10.0, 0.01))
    assert not result.ok
    assert "lost READY" in result.reason
    ok = wait_healthy(lambda: Probe(True, True), GatePolicy(5.0, 0.05, 0.01))
    assert ok.ok
    assert ok.waited_s >= 0.05


def test_gate_fails_fast_on_failure_and_can_be_interrupted() -> None:
    """A failed unit ends the wait at once; a set stop event ends it too."""
    failed = wait_healthy(lambda: Probe(False, False, "unit failed"), GatePolicy(60, 60, 0.01))
    assert not failed.ok
    assert "unhealthy before READY" in failed.reason
    assert failed.waited_s < 1
    stop = threading.Event()
    stop.set()
    stopped = wait_healthy(lambda: Probe(False, True), GatePolicy(60, 60, 5), stop)
    assert not stopped.ok
    assert "interrupted" in stopped.reason


@pytest.mark.parametrize("ready_after_s", [0.55, None])
def test_gate_never_outlasts_its_longest_wait(ready_after_s: float | None) -> None:
    """`GatePolicy.longest_wait_s`, which the update unit's timeout is sized on, holds with
    slow probes: for a node that turns READY just before the timeout and then stays
    healthy, and for one that never does."""
    policy = GatePolicy(ready_timeout_s=0.6, healthy_for_s=0.3, poll_s=0.2)
    probe_s = 0.1
    start = time.monotonic()

    def slow() -> Probe:
        time.sleep(probe_s)
        ready = ready_after_s is not None and time.monotonic() - start >= ready_after_s
        return Probe(ready, True)

    result = wait_healthy(slow, policy)
    assert result.ok == (ready_after_s is not None)
    assert time.monotonic() - start <= policy.longest_wait_s(probe_s)


def _fake_systemctl(tmp_path: Path, state: str) -> Path:
    """A `systemctl` that logs its arguments and answers is-active with `state`."""
    script = tmp_path / "systemctl"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/systemctl.log\n"
                      f"[ \"$1\" = is-active ] && echo {state}\nexit 0\n")
    script.chmod(0o755)
    return script


def test_systemctl_probe_states(tmp_path: Path) -> None:
    """is-active 'active' is ready, 'activating' is starting, 'failed' is a failure."""
    assert SystemctlProbe("x.service", str(_fake_systemctl(tmp_path, "active")))() == Probe(
        True, True)
    starting = SystemctlProbe("x.service", str(_fake_systemctl(tmp_path, "activating")))()
    assert (starting.ready, starting.healthy) == (False, True)
    failed = SystemctlProbe("x.service", str(_fake_systemctl(tmp_path, "failed")))()
    assert (failed.ready, failed.healthy) == (False, False)
    combined = AllOf([lambda: Probe(True, True), lambda: Probe(False, True, "booting")])()
    assert combined == Probe(False, True, "booting")


def test_cli_rolls_back_when_the_unit_fails(make_bundle: BundleFactory, public_key_file: Path,
                                            root: Path, tmp_path: Path) -> None:
    """Through the real command path (systemctl restart + is-active + health file), a
    new release whose unit ends up 'failed' is rolled back and the command exits 1."""
    common = ["--root", str(root), "--public-key", str(public_key_file)]
    assert main(["update", "apply", str(make_bundle("1.0.0")), *common, "--no-restart"]) == 0
    systemctl = _fake_systemctl(tmp_path, "failed")
    health = tmp_path / "run" / "health.json"
    health.parent.mkdir()
    HealthFile(health, "1.0.0").write(ready=True)
    rc = main(["update", "apply", str(make_bundle("1.1.0")), *common,
               "--systemctl", str(systemctl), "--health-file", str(health),
               "--ready-timeout", "2", "--healthy-for", "0.1", "--poll", "0.02"])
    assert rc == 1
    store = ReleaseStore(root)
    assert store.current_version() == "1.0.0"
    last = store.last_event()
    assert last is not None
    assert last.outcome == "rolled_back"
    assert "conveyor-vision.service failed" in last.reason
    calls = (tmp_path / "systemctl.log").read_text().splitlines()
    restarts = [c for c in calls if c.startswith("--no-block restart")]
    assert restarts == ["--no-block restart conveyor-vision.service"] * 2
