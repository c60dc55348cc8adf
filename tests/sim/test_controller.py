"""The simulated sortation controller against a real mosquitto: verdicts across broker restarts."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge.clock import WallClock
from edge.publish.payloads import dumps, verdict_payload
from edge.publish.topics import Topics
from edge.sim.controller import ControllerSimulator
from tests.publish.helpers import make_verdict, wait_until

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from edge.publish.broker import MosquittoBroker

_TOPICS = Topics("conveyor-vision", "line-1", "edge-01")


@pytest.fixture
def controller_factory() -> Iterator[Callable[[MosquittoBroker], ControllerSimulator]]:
    """`controller_factory(broker)`: a started controller that announces nothing (stopped after)."""
    made: list[ControllerSimulator] = []

    def make(broker: MosquittoBroker) -> ControllerSimulator:
        controller = ControllerSimulator(broker.url, _TOPICS, WallClock(), lambda _now, _n: [])
        made.append(controller)
        controller.start()
        return controller

    yield make
    for controller in made:
        controller.stop()


def _publish_verdict(broker: MosquittoBroker, seq: int) -> None:
    """Publish one verdict (QoS 1, PUBACK awaited) as a node would."""
    payload = dumps(verdict_payload(make_verdict(f"item-{seq}"), node_id=_TOPICS.node_id,
                                    line_id=_TOPICS.line_id, seq=seq, published_ms=0.0))
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"test-node-{seq}",
                         protocol=paho.MQTTv5)
    client.connect("127.0.0.1", broker.port, keepalive=5)
    client.loop_start()
    try:
        client.publish(_TOPICS.verdict, payload, qos=1).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


def test_controller_receives_verdicts_after_the_broker_restarts(
        mosquitto: MosquittoBroker,
        controller_factory: Callable[[MosquittoBroker], ControllerSimulator]) -> None:
    """A broker without persistence forgets subscriptions when it restarts: once the controller
    has reconnected it receives verdicts again (it subscribes on every connect)."""
    controller = controller_factory(mosquitto)
    _publish_verdict(mosquitto, 1)
    assert wait_until(lambda: controller.verdict_count() == 1, 5)
    mosquitto.restart()
    # The controller reconnects in its own time: publish until one arrives.
    seq = 1
    end = time.monotonic() + 10.0
    while controller.verdict_count() < 2 and time.monotonic() < end:
        seq += 1
        _publish_verdict(mosquitto, seq)
        threading.Event().wait(0.2)
    assert controller.verdict_count() >= 2
    assert controller.received.duplicates == 0


def test_verdict_published_while_the_controller_reconnects_is_not_lost(
        mosquitto_factory: Callable[..., MosquittoBroker],
        controller_factory: Callable[[MosquittoBroker], ControllerSimulator]) -> None:
    """A broker with persistence restarts; the node's next verdict goes out before the
    controller has reconnected. The broker kept the controller's session, so the verdict is
    waiting for it and arrives once it is back."""
    broker = mosquitto_factory(persistence=True)
    controller = controller_factory(broker)
    broker.restart(kill=False)  # SIGTERM: the broker saves its sessions; start on the same port
    _publish_verdict(broker, 7)
    # paho waits a second before reconnecting: the verdict went out while it was away.
    assert not controller._client.is_connected()
    assert wait_until(lambda: controller.verdict_count() == 1, 10)
    assert set(controller.received.by_key) == {("edge-01", 7)}
