"""Interop with an independent stack: node-opcua as the PLC, a whole node on the synthetic
belt as the server (needs Node.js and `npm ci --omit=dev` in tests/interop/opcua)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from edge.app.build import build_node
from edge.clock import WallClock
from edge.publish.broker import MosquittoBroker, free_port
from edge.publish.opcua.channel import OpcUaChannel
from edge.publish.opcua.contract import REASON_BITS
from edge.publish.topics import Topics
from edge.sim.controller import ControllerSimulator
from edge.types import Reason
from tests.publish.opcua.interop import (
    JsClient,
    WithPhantoms,
    js_client_missing,
    make_pki,
    node_config,
    wait_for,
)

pytestmark = pytest.mark.skipif(js_client_missing() is not None,
                                reason=str(js_client_missing()))

INDUCT_S = 8.0  # at 4 items/s: about 32 items
#: The belt starts this long after the PLC is ready (it waits for the server and the PLC,
#: which take seconds more on a busy machine, beside another test under pytest-xdist).
START_AFTER_MS = 500.0


@pytest.mark.slow
def test_a_node_opcua_plc_gets_exactly_one_result_per_announced_item(
        tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    """Over SignAndEncrypt with a user and password, the node-opcua PLC takes (and
    acknowledges) exactly one result per announced item from the PLC block, fail-safe ones
    included, each the same decision and Seq as on MQTT, and one ResultReadyEvent each."""
    pki = make_pki(tmp_path / "pki")
    cfg = node_config(tmp_path, mosquitto.url, free_port(), pki, items_per_second=4.0)
    clock = WallClock()
    built = build_node(cfg, clock, belt_start_delay_ms=300.0)
    node, world = built.node, built.world
    assert world is not None
    channel = next(c for c in node.channels if isinstance(c, OpcUaChannel))
    announcements = WithPhantoms(world, every_ms=3000.0, until_ms=INDUCT_S * 1000.0)
    world.induct_cutoff_ms = INDUCT_S * 1000.0
    controller = ControllerSimulator(
        mosquitto.url, Topics(cfg.mqtt.topic_prefix, cfg.node.line_id, cfg.node.node_id),
        clock, announcements)
    plc: JsClient | None = None
    world.start_ms = clock.now_ms() + 3_600_000.0  # the belt waits for the PLC
    node.start()
    try:
        assert node.publisher.wait_connected(10.0)
        assert channel.wait_ready(30.0), channel.failed
        plc = JsClient.start(channel.endpoint_url, pki)
        assert plc.wait_ready(30.0), plc.stderr[-20:]
        world.start_ms = clock.now_ms() + START_AFTER_MS
        controller.start()
        assert clock.now_ms() < world.start_ms, "the belt started before the PLC was ready"
        assert wait_for(lambda: clock.now_ms() - world.start_ms > INDUCT_S * 1000.0, 30.0)
        announced = set(controller.announced)
        assert wait_for(lambda: node.scheduler.in_flight == 0, 15.0)
        assert wait_for(lambda: announced <= {r["item_id"] for r in plc.of("result")}, 10.0)
        # The node handed the channel its metrics registry (and its events and state).
        assert "cv_opcua_acked_total" in node.metrics.exposition().decode()
    finally:
        if plc is not None:  # first: with the server gone, it would retry for seconds
            plc.stop()
        node.stop()
        controller.stop()
        node.inspector.close()
    results = [r for r in plc.of("result") if r["item_id"] in announced]
    counts = Counter(r["item_id"] for r in results)
    assert len(announced) >= 25
    assert set(counts) == announced
    assert set(counts.values()) == {1}, counts.most_common(3)
    assert {r["ack"] for r in results} == {"Good"}
    assert not any(r["late"] for r in results)
    fail_safe = [r for r in results if r["fail_safe"]]
    assert {r["item_id"] for r in fail_safe} >= set(announcements.phantoms)
    assert all(r["reasons"] >> REASON_BITS[Reason.NOT_SEEN] & 1
               for r in fail_safe if r["item_id"].startswith("PHANTOM"))
    actuations = controller.actuations()
    decisions = {"pass": 0, "sideline": 1}
    for r in results:
        mqtt = actuations[r["item_id"]]
        assert (r["seq"], r["decision"]) == (mqtt["seq"], decisions[str(mqtt["decision"])])
    events = Counter(e["item_id"] for e in plc.of("event") if not e["late"])
    assert all(events[item] == 1 for item in announced)
    assert channel.stats.missed == {"deadline": 0, "ack_timeout": 0}, channel.stats
    assert channel.stats.dropped == 0
    assert plc.of("error") == []
