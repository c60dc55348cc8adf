"""The files in systemd/: units verify, are hardened, outlast their work; example config loads."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from edge.commands.main import build_parser
from edge.commands.update import gate_policy
from edge.config import config_from_mapping, load_config
from edge.update.health import GatePolicy
from edge.update.updater import longest_apply_s

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"
UNIT_FILES = sorted(UNITS.glob("*.service")) + sorted(UNITS.glob("*.timer"))
EXEC = "/opt/conveyor-vision/current/venv/bin/edge-node"


def _directives(path: Path) -> list[tuple[str, str, str]]:
    section, out = "", []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key, value))
    return out


def _values(path: Path, key: str) -> list[str]:
    return [v for _, k, v in _directives(path) if k == key]


_SPAN_S = {"": 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hr": 3600.0}


def _span_s(span: str) -> float:
    """A systemd time span as these units write it ('90min', '1h 30min', '600') in s."""
    parts = re.findall(r"(\d+)\s*([a-z]*)", span)
    assert parts, span
    assert re.fullmatch(r"(\s*\d+\s*[a-z]*)+", span), span
    return sum(int(n) * _SPAN_S[unit] for n, unit in parts)


def _update_gate() -> GatePolicy:
    """The health gate the update unit runs with: its ExecStart= parsed by `edge-node`."""
    (exec_start,) = _values(UNITS / "conveyor-vision-update.service", "ExecStart")
    argv = shlex.split(exec_start)
    assert argv[0] == EXEC
    return gate_policy(build_parser().parse_args(argv[1:]))


def test_update_unit_outlasts_the_longest_update() -> None:
    """systemd must never kill an update between switching `current` and committing or
    rolling back: the update unit's TimeoutStartSec= is at least 20 % above the longest
    `update apply` can run with the gate its ExecStart= sets, worked out from the
    updater's own bounds (venv build, health gate, probes, systemctl calls)."""
    (timeout,) = _values(UNITS / "conveyor-vision-update.service", "TimeoutStartSec")
    longest_s = longest_apply_s(_update_gate())
    assert _span_s(timeout) >= 1.2 * longest_s, (
        f"TimeoutStartSec={timeout}; the longest update takes {longest_s / 60:.0f} min")


def test_engines_unit_outlasts_the_gates_wait_for_ready() -> None:
    """During an update the node's restart runs the engine build, and the health gate
    waits up to --ready-timeout for READY: systemd must not fail a build sooner."""
    (timeout,) = _values(UNITS / "conveyor-vision-engines.service", "TimeoutStartSec")
    assert _span_s(timeout) >= 1.2 * _update_gate().ready_timeout_s


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts every unit and prints nothing (unknown keys and
    bad values are warnings it prints). verify insists that ExecStart= binaries exist,
    and /opt/conveyor-vision/current/... only exists on a device, so the test copies the
    units to a temp dir with that one path rewritten to a stub executable; nothing else
    changes (asserted)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package 'systemd')")
    stub = tmp_path / "bin" / "edge-node"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    units = tmp_path / "units"
    units.mkdir()
    for src in UNIT_FILES:
        text = src.read_text()
        rewritten = text.replace(EXEC, str(stub))
        assert rewritten.replace(str(stub), EXEC) == text
        (units / src.name).write_text(rewritten)
    names = [str(units / p.name) for p in UNIT_FILES]
    assert {p.name for p in UNIT_FILES} >= {
        "conveyor-vision.service", "conveyor-vision-engines.service",
        "conveyor-vision-update.service", "conveyor-vision-update.timer"}
    result = subprocess.run([analyze, "verify", "--man=no", *names], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", result.stdout
    assert result.stderr.strip() == "", result.stderr


def _exposure(unit: Path) -> float:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package 'systemd')")
    result = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(unit)],
                            capture_output=True, text=True, timeout=60, check=False)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-500:] + result.stderr
    return float(match.group(1))


def test_node_unit_exposure_at_most_2_5() -> None:
    """`systemd-analyze security --offline=true` rates the node's unit 2.5 or lower."""
    assert _exposure(UNITS / "conveyor-vision.service") <= 2.5


@pytest.mark.parametrize("unit", ["conveyor-vision-engines.service",
                                  "conveyor-vision-update.service"])
def test_helper_units_are_hardened_too(unit: str) -> None:
    """The engine builder and the updater are no more exposed than the node."""
    assert _exposure(UNITS / unit) <= 2.5


def test_node_unit_supervision_and_sandbox() -> None:
    """The node's unit is notify-supervised with a watchdog, restarts on failure within a
    start limit, reloads by SIGHUP, runs as its own user with strict filesystem
    protection and private state/cache/log directories, gets the MQTT password as a
    credential, and reaches only the cameras' and GPU's devices."""
    unit = UNITS / "conveyor-vision.service"
    one = {k: v for _, k, v in _directives(unit)}
    assert one["Type"] == "notify"
    assert one["NotifyAccess"] == "main"
    assert one["WatchdogSec"]
    assert one["Restart"] == "on-failure"
    assert int(one["StartLimitBurst"]) > 1
    assert one["StartLimitIntervalSec"]
    assert "kill -HUP $MAINPID" in one["ExecReload"]
    assert one["User"] == "conveyor-vision"
    assert one["ProtectSystem"] == "strict"
    for key in ("StateDirectory", "CacheDirectory", "LogsDirectory", "RuntimeDirectory"):
        assert one[key] == "conveyor-vision"
    assert one["NoNewPrivileges"] == one["PrivateTmp"] == "yes"
    assert one["LoadCredential"].startswith("mqtt:")
    assert one["DevicePolicy"] == "closed"
    allowed = " ".join(_values(unit, "DeviceAllow"))
    assert "char-usb_device" in allowed
    assert "char-nvidia*" in allowed
    assert "CONVEYOR_VISION_ROOT=/opt/conveyor-vision" in _values(unit, "Environment")
    assert ("Unit", "Requires", "conveyor-vision-engines.service") in _directives(unit)
    engines = {k: v for _, k, v in _directives(UNITS / "conveyor-vision-engines.service")}
    assert engines["Type"] == "oneshot"
    assert engines["Before"] == "conveyor-vision.service"
    timer = {k: v for _, k, v in _directives(UNITS / "conveyor-vision-update.timer")}
    assert timer["OnUnitInactiveSec"]
    assert timer["WantedBy"] == "timers.target"


def test_example_config_is_a_valid_production_config(tmp_path: Path) -> None:
    """systemd/conveyor-vision.example.yaml loads with edge.config and describes a
    production node: RealSense cameras by serial, JSON logs, state under /var/lib, cache
    under /var/cache, models from the current release. The one file that exists only on
    a device (the models manifest under /opt) is pointed at a temp file for the check."""
    path = UNITS / "conveyor-vision.example.yaml"
    data = yaml.safe_load(path.read_text())
    manifest = data["models"]["manifest"]
    assert manifest == "/opt/conveyor-vision/current/engines/manifest.yaml"
    stand_in = tmp_path / "manifest.yaml"
    stand_in.write_text("models: {}\n")
    data["models"]["manifest"] = str(stand_in)
    cfg = config_from_mapping(data)
    assert all(c.source == "realsense" and c.serial for c in cfg.cameras)
    assert cfg.logging.format == "json"
    assert str(cfg.storage.state_dir) == "/var/lib/conveyor-vision"
    assert str(cfg.models.engine_cache).startswith("/var/cache/conveyor-vision")
    assert cfg.mqtt.credentials_file is None  # the password comes from LoadCredential=
    if Path(manifest).exists():  # on a device, the file loads exactly as shipped
        load_config(path)
