"""`edge-node check`: says what is wrong and how to fix it, with an exit code."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pytest
import yaml

from edge.app import doctor
from edge.app.doctor import run_checks
from edge.commands.main import main
from edge.config import config_to_mapping, load_config
from edge.publish.broker import MosquittoBroker, free_port
from tests.engines_helpers import engines_that_miss_their_golden_scores


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


def test_models_that_miss_their_golden_scores_fail_the_check(
        tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    """The check runs the golden self-test the node runs before READY (it used to say
    "passed" without running it, and the node then refused to start)."""
    cfg = load_config(None)
    cfg = dataclasses.replace(
        cfg, mqtt=dataclasses.replace(cfg.mqtt, url=mosquitto.url),
        models=dataclasses.replace(cfg.models,
                                   manifest=engines_that_miss_their_golden_scores(tmp_path),
                                   gallery_dir=tmp_path / "gallery"))
    out = io.StringIO()
    assert run_checks(cfg, out=out) == 1
    assert "[FAIL] models" in out.getvalue()
    assert "golden self-test failed" in out.getvalue()


def test_a_broker_url_the_node_refuses_fails_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials in the URL, no host, a bad port: the check says what the node would."""
    cfg = load_config(None)
    # The models check (loading the models, the golden self-test: seconds) reads no mqtt
    # setting: it runs once here, and its findings stand for the three runs below.
    models = doctor._models(cfg)
    assert [f.ok for f in models] == [True]
    monkeypatch.setattr(doctor, "_models", lambda _cfg: models)
    for url, says in (("mqtt://user:pw@127.0.0.1:1883", "credentials do not belong"),
                      ("mqtt://", "expected mqtt://HOST:PORT"),
                      ("mqtt://127.0.0.1:abc", "bad port")):
        bad = dataclasses.replace(cfg, mqtt=dataclasses.replace(cfg.mqtt, url=url))
        out = io.StringIO()
        assert run_checks(bad, broker_timeout_s=0.5, out=out) == 1
        assert says in out.getvalue()
