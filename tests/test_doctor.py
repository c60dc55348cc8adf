"""`edge-node check`: says what is wrong and how to fix it, with an exit code."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import yaml

from edge.cli import main
from edge.config import config_to_mapping, load_config
from edge.doctor import run_checks
from edge.publish.broker import MosquittoBroker, free_port


def test_healthy_setup_passes(mosquitto: MosquittoBroker) -> None:
    """Synthetic cameras, the shipped models and a running broker: all ok, exit 0."""
    cfg = load_config(None)
    cfg = dataclasses.replace(cfg, mqtt=dataclasses.replace(cfg.mqtt, url=mosquitto.url))
    out = io.StringIO()
    assert run_checks(cfg, out=out) == 0
    text = out.getvalue()
    assert "[ok  ] models" in text
    assert "golden self-test passed" in text
    assert "0 failed" in text


def test_problems_are_named_with_a_fix(tmp_path: Path) -> None:
    """No broker and a recording camera without calibration: FAIL lines with fixes, exit 1."""
    rec = tmp_path / "top.db3"
    rec.write_bytes(b"not really a recording")
    mapping = config_to_mapping(load_config(None))
    mapping["mqtt"]["url"] = f"mqtt://127.0.0.1:{free_port()}"
    mapping["cameras"] = [{"id": "top", "source": "recording", "recording": str(rec)}]
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(mapping))
    out = io.StringIO()
    code = run_checks(load_config(path), broker_timeout_s=1.0, out=out)
    text = out.getvalue()
    assert code == 1
    assert "[FAIL] calibration top: no calibration file configured" in text
    assert "fix: run `edge-calibrate belt`" in text
    assert "[FAIL] broker" in text
    assert "start the broker or fix mqtt.url" in text


def test_check_command_exit_code_for_a_bad_config(tmp_path: Path) -> None:
    """A config that does not load is reported by `edge-node check` with exit code 2."""
    path = tmp_path / "node.yaml"
    path.write_text("belt: {speed_mps: nope}\n")
    assert main(["check", "--config", str(path)]) == 2
