"""Delivery against a real mosquitto: nothing lost across broker crashes and node crashes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import paho.mqtt.client as paho
import pytest
import structlog.testing
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edge.clock import WallClock
from edge.config import MqttConfig, NodeConfig
from edge.publish.broker import MosquittoBroker
from edge.publish.delivery import Delivery
from edge.publish.outbox import Outbox
from edge.types import Decision
from tests.publish.helpers import Collector, Received, make_verdict, validator, wait_until

if TYPE_CHECKING:
    from collections.abc import Callable

    from edge.publish.outbox import OutboxRow
    from tests.publish.conftest import NodeSide

REPO = Path(__file__).resolve().parents[2]


def test_1000_verdicts_survive_two_broker_crashes(
        mosquitto_factory: Callable[..., MosquittoBroker],
        node_factory: Callable[..., NodeSide],
        collector_factory: Callable[..., Collector]) -> None:
    """1,000 verdicts with the broker SIGKILLed and restarted twice mid-stream: every verdict
    arrives at least once, and exactly once after deduplication by (node_id, seq)."""
    broker = mosquitto_factory(persistence=True)
    collector = collector_factory(broker, "+/+/+/verdict")
    node = node_factory(broker)
    threading.Event().wait(1.2)  # one autosave: the broker now knows the durable subscriber
    total = 1000
    sent: list[int] = []

    def feed() -> None:
        for i in range(total):
            sent.append(node.publisher.publish_verdict(make_verdict(f"item-{i}")))
            threading.Event().wait(0.002)

    feeder = threading.Thread(target=feed, name="test-feeder")
    feeder.start()
    for threshold in (250, 600):

        def enough(ms: list[Received], n: int = threshold) -> bool:
            return len(ms) >= n

        assert collector.wait_for(enough, 20), len(sent)
        broker.kill()
        threading.Event().wait(0.2)  # the node keeps deciding while the broker is down
        broker.start()
        assert collector.subscribed.wait(5) or wait_until(collector.subscribed.is_set, 5)
    feeder.join(30)
    assert wait_until(lambda: node.publisher.outbox_depth == 0, 30), node.publisher.metrics()
    assert collector.wait_for(lambda _ms: len(set(collector.verdict_seqs())) >= total, 30)

    seqs = collector.verdict_seqs()
    keys = [(m.json()["node_id"], m.json()["seq"]) for m in collector.on("/verdict")]
    assert len(seqs) >= total
    assert sorted(set(keys)) == sorted(("edge-01", s) for s in sent)
    assert sorted(set(seqs)) == list(range(1, total + 1))
    by_seq = {m.json()["seq"]: m.payload for m in collector.on("/verdict")}
    assert {json.loads(p)["item_id"] for p in by_seq.values()} == {
        f"item-{i}" for i in range(total)}
    metrics = node.publisher.metrics()
    assert metrics.reconnects >= 2
    assert metrics.acked >= total


def test_node_killed_mid_stream_resends_from_outbox_after_restart(
        tmp_path: Path, mosquitto_factory: Callable[..., MosquittoBroker],
        node_factory: Callable[..., NodeSide],
        collector_factory: Callable[..., Collector]) -> None:
    """A node SIGKILLed mid-stream (broker down, verdicts only in its outbox) re-sends every
    unacknowledged verdict, with its original seq, when it starts again; seq continues."""
    broker = mosquitto_factory(persistence=True)
    collector = collector_factory(broker, "+/+/+/verdict")
    threading.Event().wait(1.2)  # one autosave with the subscriber in it
    outbox = tmp_path / "node" / "outbox.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.publish.node_proc", broker.url, str(outbox), "400", "3"],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout is not None
        assert collector.wait_for(lambda ms: len(ms) >= 50, 20)
        broker.kill()
        last = 0
        for line in proc.stdout:
            if line.startswith("seq "):
                last = int(line.split()[1])
            if last >= 200:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()
    with sqlite3.connect(outbox) as db:
        pending = {row[0] for row in db.execute(
            "SELECT seq FROM outbox WHERE acked_ms IS NULL")}
        written = db.execute("SELECT MAX(seq) FROM outbox").fetchone()[0]
    unacked = len(pending)
    assert unacked >= 100  # everything published while the broker was down
    assert written >= 200

    broker.start()
    # The subscriber is back before the node (a restarted broker may not have kept its session
    # if it died between autosaves; then nothing would be queued for it).
    assert wait_until(collector.subscribed.is_set, 10)
    node = node_factory(broker, outbox=outbox)
    assert wait_until(lambda: node.publisher.outbox_depth == 0, 20), node.publisher.metrics()
    assert node.publisher.metrics().resent >= unacked
    # The node's promise is every verdict the broker never acknowledged. (Verdicts the broker
    # acknowledged just before its SIGKILL can die with it between autosaves: the broker's
    # durability, not the node's.)
    assert collector.wait_for(lambda _ms: set(collector.verdict_seqs()) >= pending, 20), (
        sorted(pending - set(collector.verdict_seqs())))
    assert node.publisher.publish_verdict(make_verdict("after-restart")) == written + 1


def test_mosquitto_sub_receives_schema_valid_verdicts(
        mosquitto: MosquittoBroker, node_factory: Callable[..., NodeSide]) -> None:
    """An independent client (mosquitto_sub) receives the verdicts, and each one validates
    against the published verdict JSON Schema."""
    node = node_factory(mosquitto)
    topic = node.publisher.topics.verdict
    sub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(mosquitto.port),
                            "-t", topic, "-q", "1", "-C", "6", "-W", "15", "-V", "mqttv5"],
                           stdout=subprocess.PIPE, text=True)
    try:
        threading.Event().wait(0.5)  # let mosquitto_sub subscribe
        for i in range(3):
            node.publisher.publish_verdict(make_verdict(f"ok-{i}"))
            node.publisher.publish_verdict(make_verdict(f"bad-{i}", decision=Decision.SIDELINE))
        out, _ = sub.communicate(timeout=20)
    finally:
        if sub.poll() is None:
            sub.kill()
    lines = out.strip().splitlines()
    assert len(lines) == 6
    for line in lines:
        validator("verdict").validate(json.loads(line))
    assert [json.loads(line)["decision"] for line in lines] == ["pass", "sideline"] * 3


def test_verdict_expiry_is_time_left_before_divert(
        mosquitto: MosquittoBroker, node_factory: Callable[..., NodeSide],
        collector_factory: Callable[..., Collector]) -> None:
    """MQTT 5 message expiry on a verdict is the time left before the divert point; a verdict
    past its deadline (audit) carries none."""
    collector = collector_factory(mosquitto, "+/+/+/verdict")
    node = node_factory(mosquitto)
    node.publisher.publish_verdict(make_verdict("soon", deadline_in_ms=4_500))
    node.publisher.publish_verdict(make_verdict("past", deadline_in_ms=-100))
    assert collector.wait_for(lambda ms: len(ms) >= 2, 5)
    soon, past = collector.on("/verdict")
    assert soon.expiry_s in (4, 5)
    assert past.expiry_s is None


def test_status_online_retained_and_offline_by_last_will(
        tmp_path: Path, mosquitto: MosquittoBroker, node_factory: Callable[..., NodeSide],
        collector_factory: Callable[..., Collector]) -> None:
    """After connecting the node's retained status is `online` with versions and health; when
    the node vanishes without a goodbye the broker's last will makes it `offline`."""
    node = node_factory(mosquitto)
    node.publisher.publish_status({"fps": 29.5, "cameras": {"top": "ok"}})
    late = collector_factory(mosquitto, "+/+/+/status", client_id="late-joiner")
    assert late.wait_for(lambda ms: any(m.json()["health"] for m in ms), 5)
    status = [m for m in late.on("/status") if m.json()["health"]][-1]
    validator("status").validate(status.json())
    assert status.json()["state"] == "online"
    assert status.json()["versions"]["node"]

    outbox = tmp_path / "vanishing.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.publish.node_proc", mosquitto.url, str(outbox), "1", "1"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert "seq 1" in proc.stdout.readline()
    watcher = collector_factory(mosquitto, "+/+/+/status", client_id="watcher")
    proc.kill()
    proc.wait(5)
    proc.stdout.close()
    assert watcher.wait_for(lambda ms: any(m.json()["state"] == "offline" for m in ms), 20)
    for m in watcher.on("/status"):
        validator("status").validate(m.json())


def test_clean_stop_flushes_and_leaves_offline(
        mosquitto: MosquittoBroker, node_factory: Callable[..., NodeSide],
        collector_factory: Callable[..., Collector]) -> None:
    """`stop()` waits for the outbox to drain, then leaves a retained `offline` status."""
    node = node_factory(mosquitto)
    for i in range(20):
        node.publisher.publish_verdict(make_verdict(f"s-{i}"))
    assert node.publisher.stop(flush_timeout_s=5) == 0
    watcher = collector_factory(mosquitto, "+/+/+/status")
    assert watcher.wait_for(bool, 5)
    assert watcher.on("/status")[-1].json()["state"] == "offline"
    assert watcher.on("/status")[-1].retain


def test_verdicts_still_go_out_when_the_outbox_cannot_store_them(
        mosquitto: MosquittoBroker, node_factory: Callable[..., NodeSide],
        collector_factory: Callable[..., Collector]) -> None:
    """The state disk is full: verdicts are published all the same (not durable, said once
    with an `outbox_write_failed` event and in the metrics). They used to be lost."""
    from tests.publish.test_outbox import _FullDisk

    collector = collector_factory(mosquitto, "+/+/+/#")
    node = node_factory(mosquitto)
    outbox = node.publisher._outbox
    outbox._db = _FullDisk(outbox._db)  # type: ignore[assignment]
    seqs = [node.publisher.publish_verdict(make_verdict(f"full-{i}")) for i in range(3)]
    assert seqs == [1, 2, 3]
    assert collector.wait_for(lambda ms: len([m for m in ms if m.topic.endswith("/verdict")])
                              >= 3, 10)
    got = sorted(m.json()["seq"] for m in collector.on("/verdict"))
    assert got == seqs
    events = [m.json() for m in collector.on("/events")]
    assert [e["kind"] for e in events].count("outbox_write_failed") == 1
    assert node.publisher.metrics().outbox_unpersisted == 3
    assert wait_until(lambda: node.publisher.metrics().acked == 3, 5)  # counted all the same


def test_refused_connack_is_not_connected(
        tmp_path: Path, mosquitto_factory: Callable[..., MosquittoBroker],
        node_factory: Callable[..., NodeSide]) -> None:
    """A broker that refuses the credentials leaves the node disconnected, with the refusal
    as its last error; the password appears in no log line."""
    pwfile = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(pwfile), "edge-01", "right-pass"],
                   check=True, capture_output=True)
    broker = mosquitto_factory(extra_config=f"allow_anonymous false\npassword_file {pwfile}")
    creds = tmp_path / "creds"
    creds.write_text("edge-01:wrong-pass-XYZZY\n")
    with structlog.testing.capture_logs() as logs:
        node = node_factory(broker, mqtt=MqttConfig(url=broker.url, credentials_file=creds),
                            connect=False)
        assert not node.publisher.wait_connected(1.5)
    assert not node.publisher.connected
    assert "refused" in (node.publisher.last_error or "")
    assert "XYZZY" not in repr(logs)
    node.publisher.stop(0.1)
    creds.write_text("edge-01:right-pass\n")
    good = node_factory(broker, mqtt=MqttConfig(url=broker.url, credentials_file=creds),
                        outbox=tmp_path / "good.db")
    assert good.publisher.connected


def test_example_acl_limits_the_node_to_its_tree(
        tmp_path: Path, mosquitto_factory: Callable[..., MosquittoBroker],
        node_factory: Callable[..., NodeSide],
        collector_factory: Callable[..., Collector]) -> None:
    """With the example ACL the node publishes into its own tree; a publish into another
    node's tree is refused by the broker (PUBACK 'not authorized')."""
    pwfile = tmp_path / "passwd"
    for user in ("edge-01", "admin"):
        subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if user == "edge-01" else []),
                        str(pwfile), user, "pw"], check=True, capture_output=True)
    acl = (REPO / "edge" / "publish" / "mosquitto-acl.example").read_text()
    aclfile = tmp_path / "acl"
    aclfile.write_text(acl + "\nuser admin\ntopic read #\n")
    broker = mosquitto_factory(
        extra_config=f"allow_anonymous false\npassword_file {pwfile}\nacl_file {aclfile}")
    collector = collector_factory(broker, "#", "admin-collector", ("admin", "pw"))
    creds = tmp_path / "creds"
    creds.write_text("edge-01:pw\n")
    node = node_factory(broker, mqtt=MqttConfig(url=broker.url, credentials_file=creds))
    node.publisher.publish_verdict(make_verdict("mine"))
    assert wait_until(lambda: node.publisher.metrics().acked == 1, 5)
    assert collector.wait_for(lambda ms: any(m.topic.endswith("/verdict") for m in ms), 5)
    other = NodeConfig(node_id="edge-02")
    intruder = node_factory(broker, mqtt=MqttConfig(url=broker.url, credentials_file=creds,
                                                    client_id="cv-edge-01b"),
                            node=other, outbox=tmp_path / "intruder.db")
    intruder.publisher.publish_verdict(make_verdict("not-mine"))
    assert wait_until(lambda: intruder.publisher.metrics().refused == 1, 5)
    assert not any("not-mine" in m.payload.decode() for m in collector.messages)



def test_status_is_refreshed_with_health_periodically(
        mosquitto: MosquittoBroker, node_factory: Callable[..., NodeSide],
        collector_factory: Callable[..., Collector]) -> None:
    """With a health provider the retained status is re-published every status interval."""
    collector = collector_factory(mosquitto, "+/+/+/status")
    calls: list[int] = []

    def health() -> dict[str, object]:
        calls.append(1)
        return {"polls": len(calls)}

    node_factory(mosquitto, mqtt=MqttConfig(url=mosquitto.url, status_interval_s=0.1),
                 health=health)
    assert collector.wait_for(
        lambda ms: sum(1 for m in ms if m.json()["health"].get("polls")) >= 3, 5)
    for m in collector.on("/status"):
        validator("status").validate(m.json())


def test_memory_bound_defers_to_the_outbox_without_loss(
        monkeypatch: pytest.MonkeyPatch, mosquitto_factory: Callable[..., MosquittoBroker],
        node_factory: Callable[..., NodeSide],
        collector_factory: Callable[..., Collector]) -> None:
    """With the broker down, paho's in-memory queue stays bounded; verdicts beyond it wait
    in the outbox and are topped up after the broker returns: all of them arrive."""
    monkeypatch.setattr("edge.publish.mqtt.MAX_QUEUED", 20)
    monkeypatch.setattr("edge.publish.delivery.MAX_QUEUED", 20)
    monkeypatch.setattr("edge.publish.mqtt.TOP_UP_INTERVAL_S", 0.05)
    # A persistent broker keeps the subscriber's session over the restart, as production's
    # would; otherwise re-sends can beat the subscriber's re-subscription.
    mosquitto = mosquitto_factory(persistence=True)
    collector = collector_factory(mosquitto, "+/+/+/verdict")
    threading.Event().wait(1.2)  # one autosave with the subscriber in it
    node = node_factory(mosquitto)
    mosquitto.stop()
    assert wait_until(lambda: not node.publisher.connected, 5)
    seqs = [node.publisher.publish_verdict(make_verdict(f"q-{i}")) for i in range(100)]
    assert node.publisher.outbox_depth == 100
    mosquitto.start()
    assert wait_until(lambda: node.publisher.outbox_depth == 0, 20), node.publisher.metrics()
    assert collector.wait_for(lambda _ms: set(collector.verdict_seqs()) >= set(seqs), 10)
    # None of them had been sent before: neither paho's queue nor the top-ups re-send.
    assert node.publisher.metrics().resent == 0


def test_verdicts_queued_while_the_broker_is_down_are_not_counted_as_resent(
        mosquitto: MosquittoBroker, node_factory: Callable[..., NodeSide]) -> None:
    """Broker down, 5 verdicts decided, broker back: they go out for the first time, so the
    metrics say resent 0 and acked 5 (they used to say resent 5)."""
    node = node_factory(mosquitto)
    mosquitto.stop()
    assert wait_until(lambda: not node.publisher.connected, 5)
    for i in range(5):
        node.publisher.publish_verdict(make_verdict(f"offline-{i}"))
    mosquitto.start()
    assert wait_until(lambda: node.publisher.metrics().acked == 5, 20), node.publisher.metrics()
    metrics = node.publisher.metrics()
    assert (metrics.published, metrics.acked, metrics.resent) == (5, 5, 0)


def test_verdicts_sent_but_never_acknowledged_are_resent_and_acked_once(
        mosquitto: MosquittoBroker, node_factory: Callable[..., NodeSide]) -> None:
    """The broker hangs (SIGSTOP) after 4 verdicts went out, then crashes and comes back: the
    node sends the 4 again and counts them resent 4, acked 4."""
    node = node_factory(mosquitto)
    assert mosquitto.pid is not None
    os.kill(mosquitto.pid, signal.SIGSTOP)
    for i in range(4):
        node.publisher.publish_verdict(make_verdict(f"hung-{i}"))
    threading.Event().wait(0.3)  # the node writes them to the hung broker's socket
    assert node.publisher.outbox_depth == 4
    mosquitto.restart()  # SIGKILL (works on a stopped process), then start
    assert wait_until(lambda: node.publisher.metrics().acked == 4, 20), node.publisher.metrics()
    metrics = node.publisher.metrics()
    assert (metrics.published, metrics.acked, metrics.resent) == (4, 4, 4)


def test_a_verdict_dropped_from_the_full_outbox_is_not_also_counted_acked(
        mosquitto_factory: Callable[..., MosquittoBroker],
        node_factory: Callable[..., NodeSide],
        collector_factory: Callable[..., Collector]) -> None:
    """A 10-row outbox, broker down, 15 verdicts: the 5 oldest are dropped from the outbox
    (paho still holds them, so they do reach the broker once it is back). Each verdict is
    counted once: published 15 = acked 10 + dropped_actionable 5 + depth 0."""
    # Persistent, so the subscriber's session outlives the outage (stop() saves it).
    mosquitto = mosquitto_factory(persistence=True)
    collector = collector_factory(mosquitto, "+/+/+/verdict")
    node = node_factory(mosquitto, outbox_max_rows=10)
    mosquitto.stop()
    assert wait_until(lambda: not node.publisher.connected, 5)
    seqs = [node.publisher.publish_verdict(make_verdict(f"full-{i}")) for i in range(15)]
    assert node.publisher.metrics().dropped_actionable == 5
    mosquitto.start()
    assert collector.wait_for(lambda _ms: set(collector.verdict_seqs()) >= set(seqs), 10)
    # PUBACKs are booked in order, the dropped five first: once the last row is marked and
    # counted, every PUBACK has been.
    assert wait_until(lambda: node.publisher.outbox_depth == 0, 20), node.publisher.metrics()
    assert wait_until(lambda: node.publisher.metrics().acked >= 10, 5)
    metrics = node.publisher.metrics()
    assert (metrics.published, metrics.acked, metrics.dropped_actionable) == (15, 10, 5)
    assert metrics.published == (metrics.acked + metrics.dropped_actionable
                                 + metrics.dropped_expired + metrics.outbox_depth)


def _disk_full_for_acks(node: NodeSide) -> threading.Event:
    """Make marking outbox rows acknowledged fail while the returned event is set (a disk
    too full even for that update); appends still work."""
    outbox = node.publisher._outbox
    real = outbox.mark_acked
    full = threading.Event()
    full.set()

    def mark_acked(seq: int, acked_ms: float, outcome: str = "acked") -> OutboxRow | None:
        if full.is_set():
            raise sqlite3.OperationalError("database or disk is full")
        return real(seq, acked_ms, outcome)

    outbox.mark_acked = mark_acked  # type: ignore[method-assign]
    return full


def test_a_puback_the_outbox_cannot_book_does_not_stop_later_ones(
        mosquitto_factory: Callable[..., MosquittoBroker],
        node_factory: Callable[..., NodeSide]) -> None:
    """A disk so full that marking a row acknowledged fails once: the PUBACKs after it are
    still booked (the booking thread used to die, and the outbox then only grew), and the
    one that failed is booked at the next top-up without sending its verdict again."""
    broker = mosquitto_factory()
    node = node_factory(broker)
    full = _disk_full_for_acks(node)
    seqs = [node.publisher.publish_verdict(make_verdict("disk-0"))]
    assert wait_until(lambda: node.publisher.metrics().acks_not_recorded == 1, 5)
    full.clear()
    seqs += [node.publisher.publish_verdict(make_verdict(f"disk-{i}")) for i in range(1, 5)]
    assert wait_until(lambda: node.publisher.metrics().acked == len(seqs), 20), (
        node.publisher.metrics())
    metrics = node.publisher.metrics()
    assert (metrics.acked, metrics.acks_not_recorded, metrics.resent) == (5, 1, 0)
    assert metrics.outbox_depth == 0
    assert sorted(a.seq for a in node.acked) == seqs


def test_a_verdict_whose_puback_cannot_be_booked_is_not_sent_again(
        mosquitto: MosquittoBroker, node_factory: Callable[..., NodeSide],
        collector_factory: Callable[..., Collector]) -> None:
    """The disk stays too full to book a PUBACK for 3 s: the broker has the verdict, so the
    controller gets it once (it used to get it again at every top-up, each second), the
    failure is logged once, and the PUBACK is booked (acked, on_acked) once the disk has
    room."""
    collector = collector_factory(mosquitto, "+/+/+/verdict")
    node = node_factory(mosquitto)
    full = _disk_full_for_acks(node)
    with structlog.testing.capture_logs() as logs:
        seq = node.publisher.publish_verdict(make_verdict("stuck"))
        assert wait_until(lambda: node.publisher.metrics().acks_not_recorded == 1, 5)
        threading.Event().wait(3.0)  # three top-ups
        metrics = node.publisher.metrics()
        assert (metrics.acked, metrics.resent, metrics.outbox_depth) == (0, 0, 1)
        assert node.acked == []
        full.clear()
        assert wait_until(lambda: node.publisher.metrics().acked == 1, 5), (
            node.publisher.metrics())
    assert collector.verdict_seqs() == [seq]
    metrics = node.publisher.metrics()
    assert (metrics.resent, metrics.acks_not_recorded, metrics.outbox_depth) == (0, 1, 0)
    assert [a.seq for a in node.acked] == [seq]
    assert [e["event"] for e in logs].count("mqtt.ack_not_recorded") == 1


def test_verdicts_the_full_outbox_drops_are_no_longer_tracked(
        tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    """Verdicts that went out, were lost with a rebuilt client (no PUBACK will ever come) and
    were then dropped from the full outbox are forgotten: their seqs used to stay in memory
    for as long as the node ran, one more for every verdict lost that way."""
    outbox = Outbox(tmp_path / "o.db", max_rows=10)
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                         protocol=MQTTProtocolVersion.MQTTv5)
    connected = threading.Event()
    client.on_connect = lambda *_: connected.set()
    client.connect("127.0.0.1", mosquitto.port)
    client.loop_start()
    try:
        assert connected.wait(5)
        delivery = Delivery(outbox, WallClock(), lambda: client, lambda: False, None)

        def append(i: int) -> OutboxRow:
            return outbox.append(item_id=f"i{i}", topic="t/verdict", deadline_ms=1e15,
                                 captured_ms=None, decided_ms=0.0, published_ms=0.0,
                                 now_ms=0.0, render=lambda seq: f'{{"seq":{seq}}}'.encode())

        lost = [append(i) for i in range(10)]
        assert all(delivery.send(row) for row in lost)  # PUBACKs are never booked here
        delivery.forget_in_flight(lambda: None)  # a rebuilt client: paho's copies are gone
        for i in range(10, 20):
            append(i)
        assert outbox.stats().dropped_actionable == 10
        assert not delivery._sent & {row.seq for row in lost}
    finally:
        client.disconnect()
        client.loop_stop()
        outbox.close()
