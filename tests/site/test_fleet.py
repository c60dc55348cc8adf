"""`edge-node fleet status`: the site's nodes from their retained status on a real broker."""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edge.clock import WallClock
from edge.commands.main import main
from edge.config import MqttConfig, NodeConfig
from edge.publish.broker import MosquittoBroker
from edge.publish.mqtt import VerdictPublisher
from edge.publish.payloads import status_payload
from edge.publish.topics import Topics

MODELS = {"embedding": "1.0.0", "damage": "1.0.0"}


def _retain(broker: MosquittoBroker, payload: dict[str, object]) -> None:
    """A node's retained status, as the node publishes it."""
    topic = Topics("conveyor-vision", str(payload["line_id"]), str(payload["node_id"])).status
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    client.publish(topic, json.dumps(payload), qos=1, retain=True).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()


def _status(node: str, line: str, *, age_s: float = 1.0, models: dict[str, str] = MODELS,
            **health: object) -> dict[str, object]:
    return status_payload("online", node_id=node, line_id=line,
                          now_ms=time.time() * 1000.0 - age_s * 1000.0,
                          versions={"node": "0.1.0", **models}, health=health)


def _fleet(*argv: str) -> tuple[int, dict[str, dict[str, object]]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["fleet", "status", "--json", *argv])
    return code, {n["node_id"]: n for n in json.loads(out.getvalue())["nodes"]}


def test_fleet_status_lists_every_node_and_flags_what_needs_a_look(
        tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    """A running node (its own publisher), a healthy, a stale, a stalled, a degraded node and
    one on other models: each listed with its figures; the odd ones flagged (exit 1)."""
    node = VerdictPublisher(MqttConfig(url=mosquitto.url), NodeConfig(node_id="edge-live",
                                                                        line_id="line-1"),
                            tmp_path / "outbox.db", WallClock(), lambda _a: None,
                            lambda _f: None, versions=MODELS)
    node.publish_status({"stalled_stages": [], "outbox_depth": 0, "sideline_rate_1h": 0.004,
                         "last_verdict_ms": time.time() * 1000.0,
                         "calibration": {"top": {"passed": True, "drift_mm": -1.2}},
                         "cameras": {"top": "streaming"}})
    node.start()
    try:
        assert node.wait_connected(5)
        _retain(mosquitto, _status("edge-ok", "line-2", outbox_depth=3))
        _retain(mosquitto, _status("edge-old", "line-3", age_s=600.0))
        _retain(mosquitto, _status("edge-stuck", "line-4", stalled_stages=["inference"]))
        _retain(mosquitto, _status("edge-cam", "line-5",
                                   degraded=["camera angled failed: gone"]))
        _retain(mosquitto, _status("edge-new", "line-6",
                                   models={"embedding": "1.0.0", "damage": "2.0.0"}))
        code, nodes = _fleet("--broker", mosquitto.url)
    finally:
        node.stop(flush_timeout_s=0.5)
    assert code == 1
    assert set(nodes) == {"edge-live", "edge-ok", "edge-old", "edge-stuck", "edge-cam",
                          "edge-new"}
    live = nodes["edge-live"]
    assert live["flags"] == []
    assert live["line_id"] == "line-1"
    assert live["models"] == MODELS
    assert live["sideline_rate_1h"] == 0.004
    assert live["calibration_drift_mm"] == 1.2
    assert live["cameras"] == {"top": "streaming"}
    assert nodes["edge-ok"]["flags"] == []
    assert nodes["edge-ok"]["outbox_depth"] == 3
    assert nodes["edge-old"]["flags"] == ["stale"]
    assert nodes["edge-stuck"]["flags"] == ["stalled"]
    assert nodes["edge-cam"]["flags"] == ["degraded"]
    assert nodes["edge-new"]["flags"] == ["models differ"]


def test_a_node_that_went_away_shows_offline_and_a_healthy_site_exits_0(
        tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    """A stopped node's retained `offline` status is listed and flagged; without it the site
    is healthy and the command exits 0; an unreachable broker is exit 2."""
    _retain(mosquitto, _status("edge-a", "line-1"))
    code, nodes = _fleet("--broker", mosquitto.url)
    assert code == 0
    assert nodes["edge-a"]["flags"] == []
    node = VerdictPublisher(MqttConfig(url=mosquitto.url), NodeConfig(node_id="edge-b"),
                            tmp_path / "outbox.db", WallClock(), lambda _a: None,
                            lambda _f: None, versions=MODELS)
    node.start()
    assert node.wait_connected(5)
    node.stop(flush_timeout_s=0.5)
    code, nodes = _fleet("--broker", mosquitto.url)
    assert code == 1
    assert nodes["edge-b"]["state"] == "offline"
    assert nodes["edge-b"]["flags"] == ["offline"]
    port = mosquitto.port
    mosquitto.stop()
    assert main(["fleet", "status", "--broker", f"mqtt://127.0.0.1:{port}",
                 "--timeout", "2"]) == 2
