"""Induct and feedback through a real broker: accepted, or rejected, counted and reported."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from tests.publish.helpers import Collector, make_verdict, validator, wait_until

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from edge.publish.broker import MosquittoBroker
    from tests.publish.conftest import NodeSide

PRODUCTS = ("box-small", "mailer-a")


class Injector:
    """The sortation controller's side: publishes raw bytes to the node's input topics."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id="test-injector")
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()

    def send(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def rig(mosquitto: MosquittoBroker, node_factory: Callable[..., NodeSide],
        collector_factory: Callable[..., Collector]) -> Iterator[tuple[NodeSide, Injector,
                                                                        Collector]]:
    """A node that knows two products, a controller injecting input, an events collector."""
    events = collector_factory(mosquitto, "+/+/+/events")
    node = node_factory(mosquitto, known_products=PRODUCTS)
    injector = Injector(mosquitto)
    yield node, injector, events
    injector.close()


def _send_and_wait(node: NodeSide, injector: Injector, topic: str, payload: bytes) -> None:
    before = node.publisher.metrics().inputs_received
    injector.send(topic, payload)
    assert wait_until(lambda: node.publisher.metrics().inputs_received > before, 5), (
        topic, payload[:80], node.publisher.metrics())


def _induct(item_id: str, product_id: str = "box-small", **extra: Any) -> bytes:
    return json.dumps({"schema_version": 1, "item_id": item_id, "product_id": product_id,
                       "induct_time_ms": 1_700_000_000_000, **extra}).encode()


def test_valid_induct_and_feedback_reach_the_node(
        rig: tuple[NodeSide, Injector, Collector]) -> None:
    """A valid induct becomes an Announcement; feedback on that item becomes Feedback."""
    node, injector, _ = rig
    topics = node.publisher.topics
    _send_and_wait(node, injector, topics.induct, _induct("A-1", belt_position_mm=120.5))
    (ann,) = node.announcements
    assert (ann.item_id, ann.product_id, ann.induct_time_ms, ann.belt_position_mm) == (
        "A-1", "box-small", 1_700_000_000_000.0, 120.5)
    assert ann.received_ms > 0
    fb = {"schema_version": 1, "item_id": "A-1", "kind": "false_positive", "note": "fine"}
    _send_and_wait(node, injector, topics.feedback, json.dumps(fb).encode())
    node.publisher.publish_verdict(make_verdict("V-9"))
    fb2 = {"schema_version": 1, "item_id": "V-9", "kind": "confirmed_damage"}
    _send_and_wait(node, injector, topics.feedback, json.dumps(fb2).encode())
    assert [(f.item_id, f.kind) for f in node.feedback] == [("A-1", "false_positive"),
                                                           ("V-9", "confirmed_damage")]
    assert node.publisher.metrics().rejected == {}


BAD_INDUCT = [
    ("too_large", b'{"x": "' + b"a" * 70_000 + b'"}'),
    ("not_utf8", b"\xff\xfe{}"),
    ("malformed_json", b'{"schema_version": 1,'),
    ("malformed_json", b'{"schema_version": 1, "schema_version": 1}'),
    ("not_an_object", b"[1, 2, 3]"),
    ("missing_field", b'{"schema_version": 1, "item_id": "B-1"}'),
    ("unknown_field", _induct("B-2", colour="red")),
    ("wrong_type", b'{"schema_version": 1, "item_id": 7, "product_id": "box-small", '
                   b'"induct_time_ms": 1}'),
    ("bad_value", _induct("B-3", induct_time_ms=-5)),
    ("unsupported_schema_version", _induct("B-4", schema_version=2)),
    ("unknown_product", _induct("B-5", product_id="teapot")),
    ("duplicate_item", _induct("DUP")),
]


def test_each_kind_of_bad_input_is_rejected_counted_and_reported(
        rig: tuple[NodeSide, Injector, Collector]) -> None:
    """Malformed JSON, wrong types, missing fields, oversized payloads, unknown products,
    duplicate item IDs and feedback for unknown items are each rejected with a counter and an
    `…/events` message naming the reason; the node stays connected."""
    node, injector, events = rig
    topics = node.publisher.topics
    _send_and_wait(node, injector, topics.induct, _induct("DUP"))
    cases = [(topics.induct, reason, payload) for reason, payload in BAD_INDUCT]
    cases.append((topics.feedback, "unknown_item",
                  b'{"schema_version": 1, "item_id": "nobody", "kind": "false_positive"}'))
    cases.append((topics.feedback, "missing_field",
                  b'{"schema_version": 1, "item_id": "DUP", "kind": "packaging_changed"}'))
    for topic, reason, payload in cases:
        before = node.publisher.metrics().rejected.get(reason, 0)
        _send_and_wait(node, injector, topic, payload)
        assert node.publisher.metrics().rejected.get(reason, 0) == before + 1, reason
    assert events.wait_for(lambda ms: len(ms) >= len(cases), 5)
    reported = [m.json() for m in events.on("/events")]
    for event in reported:
        validator("event").validate(event)
    assert [e["detail"]["reason"] for e in reported] == [r for _, r, _ in cases]
    assert all(e["kind"] == "rejected_input" for e in reported)
    assert node.publisher.connected
    assert len(node.announcements) == 1


def test_fuzzed_input_never_stops_the_node(rig: tuple[NodeSide, Injector, Collector]) -> None:
    """Random bytes and random JSON at the induct and feedback topics, through the broker:
    every message is either accepted or rejected and counted, and the node keeps publishing."""
    node, injector, _ = rig
    topics = node.publisher.topics
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner,
                                                                    max_size=4),
        max_leaves=10)
    near_valid = st.fixed_dictionaries(
        {"schema_version": st.sampled_from([1, 2, "1"]),
         "item_id": st.text(max_size=10) | st.integers(),
         "product_id": st.sampled_from([*PRODUCTS, "teapot"]) | st.text(max_size=5),
         "kind": st.sampled_from(["false_positive", "packaging_changed", "?"])},
        optional={"induct_time_ms": st.floats(allow_nan=False) | st.integers(),
                  "belt_position_mm": st.integers(), "note": st.text(max_size=5)})
    payloads = st.binary(max_size=300) | json_values.map(
        lambda v: json.dumps(v).encode()) | near_valid.map(lambda v: json.dumps(v).encode())

    @settings(max_examples=120, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(topic=st.sampled_from(topics.inputs), payload=payloads)
    def throw(topic: str, payload: bytes) -> None:
        _send_and_wait(node, injector, topic, payload)

    throw()
    m = node.publisher.metrics()
    assert m.inputs_received >= 120
    assert sum(m.accepted.values()) + sum(m.rejected.values()) == m.inputs_received
    assert sum(m.rejected.values()) > 0
    assert node.publisher.connected
    node.publisher.publish_verdict(make_verdict("still-alive"))
    assert wait_until(lambda: any(a.item_id == "still-alive" for a in node.acked), 5)
