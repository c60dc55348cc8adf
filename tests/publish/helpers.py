"""Test helpers: an independent subscriber, verdict factories, the JSON Schemas."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

import jsonschema  # type: ignore[import-untyped]
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.clock import WallClock
from edge.publish import SCHEMA_DIR
from edge.types import DamageFinding, DamageType, Decision, Reason, Scores, Verdict

if TYPE_CHECKING:
    from collections.abc import Callable

    from edge.publish.broker import MosquittoBroker


@cache
def validator(name: str) -> jsonschema.protocols.Validator:
    """A validator for ``schemas/<name>.schema.json``."""
    schema = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def make_verdict(item_id: str, *, deadline_in_ms: float = 60_000.0,
                 decision: Decision = Decision.PASS, now_ms: float | None = None) -> Verdict:
    now = WallClock().now_ms() if now_ms is None else now_ms
    return Verdict(
        item_id=item_id, product_id="box-small", decision=decision,
        reasons=(Reason.DAMAGE,) if decision is Decision.SIDELINE else (),
        scores=Scores(damage=0.91 if decision is Decision.SIDELINE else 0.02, anomaly=0.3,
                      geometry=None, fused=0.5, per_type={"crush": 0.9, "tear": 0.01}),
        threshold_version="thr-2024-06", model_versions={"damage": "effnet-lite0@3"},
        findings=(DamageFinding(DamageType.CRUSH, 0.9, (10, 12, 30, 20)),)
        if decision is Decision.SIDELINE else (),
        captured_ms=now - 40.0, decided_ms=now, deadline_ms=now + deadline_in_ms,
    )


@dataclass(frozen=True, slots=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    expiry_s: int | None

    def json(self) -> Any:
        return json.loads(self.payload)


class Collector:
    """An independent MQTT 5 subscriber with a persistent session (like a controller)."""

    def __init__(self, broker: MosquittoBroker, topic: str = "#",
                 client_id: str = "test-collector", login: tuple[str, str] | None = None
                 ) -> None:
        self.messages: list[Received] = []
        self._cond = threading.Condition()
        self._topic = topic
        self.subscribed = threading.Event()
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_disconnect = lambda *_: self.subscribed.clear()
        self.client.reconnect_delay_set(0.02, 0.2)  # type: ignore[arg-type]  # floats work
        if login is not None:
            self.client.username_pw_set(*login)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", broker.port, keepalive=5, clean_start=False,
                            properties=props)
        self.client.loop_start()
        assert self.subscribed.wait(5), "collector could not subscribe"

    def _on_connect(self, client: paho.Client, *_: Any) -> None:
        client.subscribe(self._topic, qos=1)

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        expiry = getattr(msg.properties, "MessageExpiryInterval", None)
        with self._cond:
            self.messages.append(Received(msg.topic, bytes(msg.payload), msg.retain, expiry))
            self._cond.notify_all()

    def on(self, topic_suffix: str) -> list[Received]:
        with self._cond:
            return [m for m in self.messages if m.topic.endswith(topic_suffix)]

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout_s: float) -> bool:
        end = time.monotonic() + timeout_s
        with self._cond:
            while not predicate(self.messages):
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
            return True

    def verdict_seqs(self) -> list[int]:
        return [int(m.json()["seq"]) for m in self.on("/verdict")]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_until(predicate: Callable[[], bool], timeout_s: float, step_s: float = 0.01) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step_s)
    return predicate()
