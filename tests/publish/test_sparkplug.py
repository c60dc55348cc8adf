"""Sparkplug B for SCADA, as a primary host sees it: a plain paho subscriber on `spBv1.0/#`.

Payloads are decoded with pysparkplug, with explicit checks of every field, and the verdict,
birth and death payloads also with a second decoder: the protobuf runtime, against the
Sparkplug B payload schema (tests/publish/sparkplug_b_subset.proto) compiled at test time with
grpcio-tools, so that an encoding pysparkplug only agrees with itself on would fail.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.app.build import build_node
from edge.app.channels import controller_channels
from edge.clock import WallClock
from edge.config import (
    Config,
    ConfigError,
    MqttConfig,
    NodeConfig,
    SparkplugConfig,
    TlsConfig,
    config_from_mapping,
    load_config,
)
from edge.publish.broker import BrokerTls, MosquittoBroker, free_port
from edge.publish.sparkplug import BDSEQ_FILE, SparkplugChannel
from edge.publish.topics import Topics
from edge.sim.controller import ControllerSimulator
from edge.types import Decision, Reason
from tests.publish.helpers import Collector, make_verdict, wait_until
from tests.publish.sparkplug_host import (
    EDGE,
    GROUP,
    REBIRTH,
    FakeNode,
    Host,
    check_with_schema,
    compile_schema,
    segments,
)
from tests.publish.test_tls import Authority

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def schema(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The second decoder: the Sparkplug B payload schema compiled at test time."""
    return compile_schema(tmp_path_factory.mktemp("proto"))


@pytest.fixture
def host(mosquitto: MosquittoBroker, collector_factory: Callable[..., Collector]) -> Host:
    """The SCADA primary host, subscribed before the edge node starts."""
    return Host(collector_factory(mosquitto, "spBv1.0/#", client_id="scada-host"))


@pytest.fixture
def make_channel(tmp_path: Path) -> Iterator[Callable[..., SparkplugChannel]]:
    """`make_channel(url, node=None, state=None, tls=None, **sparkplug)`: a started channel."""
    made: list[SparkplugChannel] = []

    def make(url: str, node: FakeNode | None = None, state: Path | None = None,
             tls: TlsConfig | None = None, **sparkplug: Any) -> SparkplugChannel:
        cfg = SparkplugConfig(enabled=True, group_id=GROUP, health_interval_s=0.05,
                              **sparkplug)
        channel = SparkplugChannel(cfg, MqttConfig(url=url, keepalive_s=5,
                                              tls=tls or TlsConfig()),
                                   NodeConfig(node_id=EDGE), state or tmp_path / "state",
                                   WallClock())
        if node is not None:
            channel.watch(node.health, lambda: {"damage": "effnet-lite0@3"})
        made.append(channel)
        channel.start()
        return channel

    yield make
    for channel in made:
        channel.stop(1.0)


def test_births_come_first_and_seq_counts_up_to_255_and_wraps_without_a_gap(
        mosquitto: MosquittoBroker, host: Host,
        make_channel: Callable[..., SparkplugChannel]) -> None:
    """NBIRTH (seq 0) and a DBIRTH per camera come first; seq then wraps 255 -> 0 with no gap."""
    channel = make_channel(mosquitto.url, FakeNode(top="streaming", angled="streaming"))
    assert host.wait(lambda h: len(h.of("DBIRTH")) == 2)
    for i in range(300):
        channel.offer(make_verdict(f"item-{i}"), 1000 + i)
    assert host.wait(lambda h: len(h.verdicts()) == 300, 15)
    messages = host.messages()
    assert [(m.kind, m.device) for m in messages[:3]] == [
        ("NBIRTH", None), ("DBIRTH", "angled"), ("DBIRTH", "top")]
    assert [m.seq for m in messages] == [i % 256 for i in range(len(messages))]
    assert len(messages) > 256
    assert [v["Verdict/seq"] for v in host.verdicts()] == list(range(1000, 1300))
    assert [v["Verdict/item_id"] for v in host.verdicts()][:2] == ["item-0", "item-1"]
    assert channel.metrics()["published"] == 300
    assert channel.metrics()["dropped"] == 0


def _spawn(url: str, state: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.publish.sparkplug_proc", url, str(state)], cwd=REPO,
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _born(proc: subprocess.Popen[str]) -> int:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("born "), line
    return int(line.split()[1])


def test_a_killed_process_leaves_ndeath_as_its_will_with_the_bdseq_of_its_nbirth(
        tmp_path: Path, mosquitto: MosquittoBroker, host: Host, schema: Any) -> None:
    """A killed node's will NDEATH has its NBIRTH's bdSeq; restarted, it is born with the next."""
    state = tmp_path / "state"
    procs = [_spawn(mosquitto.url, state)]
    try:
        bd_seq = _born(procs[0])
        assert host.wait(lambda h: len(h.verdicts()) == 3)
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(5)
        assert host.wait(lambda h: len(h.of("NDEATH")) == 1)
        [birth], [death] = host.of("NBIRTH"), host.of("NDEATH")
        assert birth.metrics["bdSeq"] == death.metrics["bdSeq"] == bd_seq
        independent = schema.FromString(death.raw)
        assert not independent.HasField("seq")  # NDEATH has no seq
        [metric] = independent.metrics
        assert (metric.name, metric.datatype, metric.long_value) == ("bdSeq", 4, bd_seq)
        procs.append(_spawn(mosquitto.url, state))
        assert _born(procs[1]) == (bd_seq + 1) % 256
        assert host.wait(lambda h: len(h.of("NBIRTH")) == 2)
        assert host.of("NBIRTH")[1].metrics["bdSeq"] == (bd_seq + 1) % 256
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            if proc.stdout is not None:
                proc.stdout.close()


def test_a_clean_stop_sends_the_queued_verdicts_then_ndeath_and_bdseq_wraps_on_restart(
        tmp_path: Path, mosquitto: MosquittoBroker, host: Host,
        make_channel: Callable[..., SparkplugChannel]) -> None:
    """A clean stop sends queued verdicts, then NDEATH; the restart's bdSeq is the next (255->0)."""
    state = tmp_path / "state"
    state.mkdir()
    (state / BDSEQ_FILE).write_text("255\n")
    channel = make_channel(mosquitto.url, state=state)
    assert host.wait(lambda h: len(h.of("NBIRTH")) == 1)
    for i in range(20):
        channel.offer(make_verdict(f"item-{i}"), i)
    channel.stop(5.0)
    assert host.wait(lambda h: len(h.of("NDEATH")) == 1)
    messages = host.messages()
    assert [m.kind for m in messages] == ["NBIRTH"] + ["NDATA"] * 20 + ["NDEATH"]
    assert messages[0].metrics["bdSeq"] == messages[-1].metrics["bdSeq"] == 255
    make_channel(mosquitto.url, state=state)
    assert host.wait(lambda h: len(h.of("NBIRTH")) == 2)
    assert host.of("NBIRTH")[1].metrics["bdSeq"] == 0


def test_a_rebirth_command_republishes_nbirth_and_dbirths_from_seq_0(
        mosquitto: MosquittoBroker, host: Host,
        make_channel: Callable[..., SparkplugChannel]) -> None:
    """An NCMD rebirth republishes NBIRTH and the DBIRTHs from seq 0; a bad command is ignored."""
    channel = make_channel(mosquitto.url, FakeNode(top="streaming", angled="waiting"))
    assert host.wait(lambda h: len(h.of("DBIRTH")) == 1)
    for i in range(5):
        channel.offer(make_verdict(f"item-{i}"), i)
    assert host.wait(lambda h: len(h.verdicts()) == 5)
    host.collector.client.publish(f"spBv1.0/{GROUP}/NCMD/{EDGE}", b"\xff\xff not protobuf",
                                  qos=1)
    host.command_rebirth()
    assert host.wait(lambda h: len(h.of("NBIRTH")) == 2)
    channel.offer(make_verdict("after"), 5)
    assert host.wait(lambda h: len(h.verdicts()) == 6)
    births = host.of("NBIRTH")
    assert births[0].metrics["bdSeq"] == births[1].metrics["bdSeq"]
    assert births[1].metrics[REBIRTH] is False
    assert segments(host.messages()) == [list(range(7)), list(range(3))]
    assert [(m.kind, m.device) for m in host.messages()[7:]] == [
        ("NBIRTH", None), ("DBIRTH", "top"), ("NDATA", None)]
    assert channel.metrics()["rebirths"] == 1


def test_verdict_metrics_decode_to_the_verdict_fail_safe_and_late_ones_included(
        mosquitto: MosquittoBroker, host: Host, schema: Any,
        make_channel: Callable[..., SparkplugChannel]) -> None:
    """Verdict NDATA decodes (pysparkplug and the schema) to the verdict; fail-safe scores null."""
    channel = make_channel(mosquitto.url, FakeNode())
    assert host.wait(lambda h: len(h.of("NBIRTH")) == 1)
    decided = make_verdict("item-d", decision=Decision.SIDELINE)
    fail_safe = dataclasses.replace(make_verdict("item-f"), decision=Decision.SIDELINE,
                                    reasons=(Reason.TIMEOUT,), scores=None, fail_safe=True)
    late = dataclasses.replace(make_verdict("item-l"), late=True)
    for seq, verdict in enumerate((decided, fail_safe, late), start=41):
        channel.offer(verdict, seq)
    assert host.wait(lambda h: len(h.verdicts()) == 3)
    d, f, lt = host.verdicts()
    assert (d["Verdict/seq"], d["Verdict/item_id"], d["Verdict/product_id"]) == (
        41, "item-d", "box-small")
    assert (d["Verdict/decision"], d["Verdict/sideline"], d["Verdict/reasons"]) == (
        "sideline", True, "damage")
    assert (d["Verdict/scores/fused"], d["Verdict/scores/damage"]) == (0.5, 0.91)
    assert (d["Verdict/scores/anomaly"], d["Verdict/scores/geometry"]) == (0.3, None)
    assert (d["Verdict/fail_safe"], d["Verdict/late"]) == (False, False)
    assert d["Verdict/threshold_version"] == "thr-2024-06"
    decided_at = dt.datetime.fromtimestamp(decided.decided_ms / 1000, tz=dt.timezone.utc)
    assert abs(d["Verdict/decided"] - decided_at) <= dt.timedelta(milliseconds=1)
    assert (f["Verdict/seq"], f["Verdict/fail_safe"], f["Verdict/reasons"]) == (42, True,
                                                                                 "timeout")
    assert (f["Verdict/decision"], f["Verdict/sideline"]) == ("sideline", True)
    assert [f[f"Verdict/scores/{s}"] for s in ("fused", "damage", "anomaly", "geometry")] == [
        None] * 4
    assert (lt["Verdict/seq"], lt["Verdict/late"], lt["Verdict/decision"]) == (43, True, "pass")
    ndata = [m for m in host.of("NDATA") if "Verdict/item_id" in m.metrics]
    birth = host.of("NBIRTH")[0].raw
    check_with_schema(schema, ndata[0].raw, {
        "Verdict/seq": (8, "long_value", 41), "Verdict/item_id": (12, "string_value", "item-d"),
        "Verdict/sideline": (11, "boolean_value", True),
        "Verdict/scores/fused": (10, "double_value", 0.5),
        "Verdict/scores/geometry": (10, None, None),
        "Verdict/decided": (13, "long_value", int(decided.decided_ms))}, birth)
    check_with_schema(schema, ndata[1].raw, {
        "Verdict/fail_safe": (11, "boolean_value", True),
        "Verdict/scores/fused": (10, None, None), "Verdict/reasons": (12, "string_value",
                                                                      "timeout")}, birth)
    assert schema.FromString(ndata[0].raw).metrics[0].timestamp == int(decided.decided_ms)
    assert schema.FromString(birth).HasField("seq")
    assert schema.FromString(birth).seq == 0
    check_with_schema(schema, birth, {
        "bdSeq": (4, "long_value", channel.bd_seq), REBIRTH: (11, "boolean_value", False),
        "Verdict/item_id": (12, None, None), "Verdict/scores/fused": (10, None, None),
        "Node Info/node_id": (12, "string_value", EDGE),
        "Node Info/models/damage": (12, "string_value", "effnet-lite0@3"),
        "Node/deadline_misses": (8, "long_value", 0)})


def test_a_camera_that_stops_streaming_gets_ddeath_and_dbirth_when_it_is_back(
        mosquitto: MosquittoBroker, host: Host,
        make_channel: Callable[..., SparkplugChannel]) -> None:
    """A camera that stops streaming gets a DDEATH and degraded health, and a DBIRTH when back."""
    node = FakeNode(top="streaming", angled="waiting")
    make_channel(mosquitto.url, node)
    assert host.wait(lambda h: [m.device for m in h.of("DBIRTH")] == ["top"])
    node.state["cameras"]["angled"] = "streaming"
    assert host.wait(lambda h: [m.device for m in h.of("DBIRTH")] == ["top", "angled"])
    node.state.update(degraded=["camera top failed: usb gone"], stalled_stages=["capture-top"],
                      deadline_misses=2, broker_connected=False)
    node.state["cameras"]["top"] = "failed: usb gone"
    assert host.wait(lambda h: [m.device for m in h.of("DDEATH")] == ["top"])
    health = {k: v for m in host.of("NDATA") for k, v in m.metrics.items()}
    assert health["Node/degraded"] is True
    assert health["Node/degraded_detail"] == "camera top failed: usb gone"
    assert (health["Node/stalled"], health["Node/stalled_stages"]) == (True, "capture-top")
    assert (health["Node/deadline_misses"], health["Node/broker_connected"]) == (2, False)
    node.state["cameras"]["top"] = "streaming"
    assert host.wait(lambda h: [m.device for m in h.of("DBIRTH")] == ["top", "angled", "top"])
    born = host.of("DBIRTH")[-1].metrics
    assert (born["state"], born["streaming"]) == ("streaming", True)
    [run] = segments(host.messages())
    assert run == list(range(len(run)))


def test_offer_returns_at_once_and_counts_what_a_full_queue_drops(
        mosquitto_factory: Callable[..., MosquittoBroker],
        collector_factory: Callable[..., Collector],
        make_channel: Callable[..., SparkplugChannel]) -> None:
    """Broker away: offer never waits, drops past the queue are counted, the rest sent later."""
    port = free_port()
    channel = make_channel(f"mqtt://127.0.0.1:{port}", queue_size=10)
    start = time.monotonic()
    for i in range(50):
        channel.offer(make_verdict(f"item-{i}"), i)
    assert time.monotonic() - start < 0.5
    assert (channel.metrics()["queued"], channel.metrics()["dropped"]) == (10, 40)
    broker = mosquitto_factory(port=port)
    host = Host(collector_factory(broker, "spBv1.0/#", client_id="scada-host"))
    assert wait_until(lambda: channel.metrics()["published"] == 10, 10)
    # The host may have subscribed after the first birth: it asks for another.
    assert wait_until(lambda: host.command_rebirth() or bool(host.of("NBIRTH")), 5, 0.2)
    assert host.of("NBIRTH")[-1].metrics["Node/verdicts_dropped"] == 40


def test_over_mqtts_it_verifies_the_broker_and_presents_its_client_certificate(
        tmp_path: Path, mosquitto_factory: Callable[..., MosquittoBroker],
        make_channel: Callable[..., SparkplugChannel]) -> None:
    """Over mqtts:// it is born on a broker its CA signed, and never on one another CA signed."""
    ca, rogue = Authority(tmp_path, "plant"), Authority(tmp_path, "rogue")
    client = ca.issue(EDGE, server=False)
    tls = TlsConfig(ca_file=ca.path, cert_file=client.cert, key_file=client.key)
    server = ca.issue("broker", server=True)
    good = make_channel(mosquitto_factory(tls=BrokerTls(ca.path, server.cert, server.key)).url,
                        tls=tls, state=tmp_path / "good")
    server = rogue.issue("broker", server=True)
    bad = make_channel(mosquitto_factory(tls=BrokerTls(ca.path, server.cert, server.key)).url,
                       tls=tls, state=tmp_path / "bad")
    assert wait_until(lambda: good.metrics()["births"] == 1, 5)
    assert wait_until(lambda: bad.metrics()["connect_failures"] >= 2, 5)
    assert (bad.metrics()["connects"], bad.metrics()["births"]) == (0, 0)


def test_sparkplug_is_off_unless_enabled_and_uses_the_nodes_broker_unless_told_otherwise(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Off unless enabled; the node's ID and broker by default; an own broker obeys mqtt: rules."""
    base: dict[str, Any] = {"node": {"node_id": "edge-09"},
                            "storage": {"state_dir": str(tmp_path)}}
    assert controller_channels(config_from_mapping(base), WallClock()) == []
    cfg = config_from_mapping({**base, "sparkplug": {"enabled": True}})
    [channel] = controller_channels(cfg, WallClock())
    assert isinstance(channel, SparkplugChannel)
    assert (channel.edge_node_id, channel.group_id) == ("edge-09", "conveyor-vision")
    assert channel.broker is cfg.mqtt
    own = {"url": "mqtts://127.0.0.1:8884"}
    cfg = config_from_mapping({**base, "sparkplug": {"enabled": True, "edge_node_id": "spb-1",
                                                     "broker": own}})
    [channel] = controller_channels(cfg, WallClock())
    assert (channel.edge_node_id, channel.broker.url) == ("spb-1", "mqtts://127.0.0.1:8884")
    with pytest.raises(ConfigError, match=r"sparkplug\.group_id"):
        config_from_mapping({**base, "sparkplug": {"group_id": "a/b"}})
    with pytest.raises(ConfigError, match=r"sparkplug\.broker\.url"):
        config_from_mapping({**base, "sparkplug": {"broker": {"url": "tcp://127.0.0.1"}}})
    monkeypatch.setenv("CV_MQTT_USERNAME", "scada")  # refused before any connection
    remote = {"url": "mqtt://broker.site.example:1883"}
    cfg = config_from_mapping({**base, "sparkplug": {"enabled": True, "broker": remote}})
    with pytest.raises(ConfigError, match=r"sparkplug\.broker\.url.*clear text"):
        controller_channels(cfg, WallClock())


def _line_config(tmp_path: Path, broker: MosquittoBroker) -> Config:
    """The default synthetic node, with items arriving quickly and Sparkplug B enabled."""
    cfg = load_config(None)
    return dataclasses.replace(
        cfg, synthetic=dataclasses.replace(cfg.synthetic, items_per_second=4.0),
        belt=dataclasses.replace(cfg.belt, induct_to_camera_m=1.0),
        mqtt=dataclasses.replace(cfg.mqtt, url=broker.url),
        storage=dataclasses.replace(cfg.storage, state_dir=tmp_path / "state"),
        models=dataclasses.replace(cfg.models, gallery_dir=tmp_path / "state" / "gallery"),
        node=dataclasses.replace(cfg.node, node_id=EDGE),
        sparkplug=SparkplugConfig(enabled=True, group_id=GROUP, health_interval_s=0.2))


def test_a_node_with_sparkplug_enabled_sends_one_ndata_per_mqtt_verdict_with_its_seq(
        tmp_path: Path, mosquitto: MosquittoBroker, host: Host) -> None:
    """A node with sparkplug.enabled sends exactly one NDATA per MQTT verdict, matched by seq."""
    cfg = _line_config(tmp_path, mosquitto)
    clock = WallClock()
    built = build_node(cfg, clock, belt_start_delay_ms=300.0)
    node, world = built.node, built.world
    assert world is not None
    topics = Topics(cfg.mqtt.topic_prefix, cfg.node.line_id, cfg.node.node_id)
    controller = ControllerSimulator(cfg.mqtt.url, topics, clock, world.due_announcements)
    node.start()
    try:
        assert node.publisher.wait_connected(5.0)
        controller.start()
        assert wait_until(lambda: len(controller.received.by_key) >= 12, 30.0, 0.1)
    finally:
        node.stop()
        published = node.publisher.metrics().published
        wait_until(lambda: len(controller.received.by_key) >= published, 5.0, 0.05)
        controller.stop()
    assert host.wait(lambda h: len(h.of("NDEATH")) == 1)
    mqtt = {seq: v["item_id"] for (_node, seq), v in controller.received.by_key.items()}
    assert len(mqtt) == published >= 12
    sparkplug = Counter(v["Verdict/seq"] for v in host.verdicts())
    assert sparkplug == Counter(list(mqtt))  # each MQTT verdict's seq exactly once
    assert {v["Verdict/seq"]: v["Verdict/item_id"] for v in host.verdicts()} == mqtt
    [birth] = host.of("NBIRTH")
    assert set(node.inspector.model_versions()) <= {
        k.removeprefix("Node Info/models/") for k in birth.metrics}
    assert {m.device for m in host.of("DBIRTH")} == {"top", "angled"}
    first_data = next(i for i, m in enumerate(host.messages()) if m.kind == "NDATA")
    assert host.messages()[0].kind == "NBIRTH"
    assert first_data > 0
