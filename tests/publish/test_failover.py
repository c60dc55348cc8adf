"""Broker failover: `mqtt.url` as a list, the node moving to the next broker when one dies."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from edge.config import ConfigError, MqttConfig, config_from_mapping
from edge.publish.broker import MosquittoBroker
from tests.publish.conftest import NodeSide
from tests.publish.helpers import Collector, make_verdict, wait_until


def _bridged_pair(factory: Callable[..., MosquittoBroker]) -> tuple[MosquittoBroker,
                                                                      MosquittoBroker]:
    """Broker B (persistent), and broker A bridging everything under the prefix to B: a site's
    redundant pair, where a subscriber on B sees what reaches either."""
    b = factory(persistence=True)
    a = factory(extra_config=f"""
connection to-b
address 127.0.0.1:{b.port}
topic conveyor-vision/# out 1
cleansession false
notifications false
""")
    return a, b


def test_every_verdict_reaches_the_surviving_broker_when_the_active_one_dies(
        mosquitto_factory: Callable[..., MosquittoBroker],
        node_factory: Callable[..., NodeSide],
        collector_factory: Callable[..., Collector]) -> None:
    """The node publishes to the first broker; SIGKILLed, the node moves to the second and
    sends every verdict the first had not acknowledged there: a persistent subscriber on the
    surviving broker receives each (node_id, seq) published, duplicates only with their seq."""
    a, b = _bridged_pair(mosquitto_factory)
    collector = collector_factory(b, "+/+/+/verdict")
    node = node_factory(a, mqtt=MqttConfig(url=(a.url, b.url), keepalive_s=5))
    first = [node.publisher.publish_verdict(make_verdict(f"before-{i}")) for i in range(30)]
    assert collector.wait_for(lambda ms: set(collector.verdict_seqs()) >= set(first), 20)
    a.kill()  # the bridge has delivered all of them: nothing is only on A
    later = [node.publisher.publish_verdict(make_verdict(f"after-{i}")) for i in range(30)]
    assert wait_until(lambda: node.publisher.outbox_depth == 0, 30), node.publisher.metrics()
    published = set(first) | set(later)
    assert collector.wait_for(lambda ms: set(collector.verdict_seqs()) >= published, 20)
    by_seq: dict[int, set[str]] = {}
    for m in collector.on("/verdict"):
        by_seq.setdefault(m.json()["seq"], set()).add(m.json()["item_id"])
    assert set(by_seq) == published
    assert all(len(items) == 1 for items in by_seq.values())  # a repeat is the same verdict
    metrics = node.publisher.metrics()
    assert metrics.failovers >= 1
    assert metrics.published == len(published)
    assert metrics.acked == len(published)


def test_a_node_starts_on_the_second_broker_when_the_first_never_answers(
        mosquitto: MosquittoBroker, node_factory: Callable[..., NodeSide],
        collector_factory: Callable[..., Collector]) -> None:
    """The first broker of the list is down at start: the node connects to the next one."""
    collector = collector_factory(mosquitto, "+/+/+/verdict")
    down = MqttConfig(url=("mqtt://127.0.0.1:9", mosquitto.url), keepalive_s=5)
    node = node_factory(mosquitto, mqtt=down)
    seq = node.publisher.publish_verdict(make_verdict("one"))
    assert collector.wait_for(lambda ms: seq in collector.verdict_seqs(), 10)
    assert node.publisher.metrics().failovers >= 1


def test_a_failover_list_is_one_scheme_and_each_url_is_checked() -> None:
    """`mqtt.url` as a YAML list: each URL is checked like a single one (naming its index),
    and mixing mqtt:// with mqtts:// is refused."""
    cfg = config_from_mapping({"mqtt": {"url": ["mqtt://127.0.0.1:1883",
                                                "mqtt://localhost:1884"]}})
    assert cfg.mqtt.urls == ("mqtt://127.0.0.1:1883", "mqtt://localhost:1884")
    with pytest.raises(ConfigError, match=r"mqtt\.url\[1\]"):
        config_from_mapping({"mqtt": {"url": ["mqtt://127.0.0.1:1883", "http://x"]}})
    with pytest.raises(ConfigError, match="one scheme"):
        config_from_mapping({"mqtt": {"url": ["mqtt://127.0.0.1:1883",
                                              "mqtts://127.0.0.1:8883"]}})
    assert json.loads(json.dumps(list(cfg.mqtt.urls))) == list(cfg.mqtt.urls)
