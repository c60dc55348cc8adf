"""A stand-in for the sortation controller, speaking the node's MQTT contract.

It announces the synthetic world's items on `…/induct` at their induct
times, as a real controller would, and collects the verdicts the node
publishes on `…/verdict`, de-duplicated by (node_id, seq). The demo, the
end-to-end tests and the benchmark use it as an independent MQTT client.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes

from edge.clock import Clock
from edge.publish.delivery import properties
from edge.publish.topics import Topics
from edge.types import Announcement
from edge.workers import WorkerThread

log = structlog.get_logger(__name__)

#: How long the broker keeps the simulator's session, and the verdicts queued for it, while the
#: simulator is away.
SESSION_EXPIRY_S = 600


@dataclass(slots=True)
class ReceivedVerdicts:
    """Verdicts as the controller saw them."""

    by_key: dict[tuple[str, int], dict[str, object]] = field(default_factory=dict)
    duplicates: int = 0
    received_ms: dict[tuple[str, int], float] = field(default_factory=dict)

    def actuations(self) -> dict[str, dict[str, object]]:
        """The verdict that moves goods, per item: the first one that is not `late`."""
        out: dict[str, dict[str, object]] = {}
        for key in sorted(self.by_key, key=lambda k: k[1]):
            v = self.by_key[key]
            item = str(v["item_id"])
            if not v.get("late") and item not in out:
                out[item] = v
        return out


class ControllerSimulator:
    """Announces items and records verdicts over a real MQTT connection."""

    def __init__(self, url: str, topics: Topics, clock: Clock,
                 announcements: Callable[[float, int], list[Announcement]],
                 on_verdict: Callable[[dict[str, object]], None] | None = None) -> None:
        parsed = urlparse(url)
        self._host = parsed.hostname or "127.0.0.1"
        self._port = parsed.port or 1883
        self.topics = topics
        self._clock = clock
        self._announcements = announcements
        self._on_verdict = on_verdict
        self.received = ReceivedVerdicts()
        self.announced: dict[str, Announcement] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                   client_id=f"cv-controller-sim-{uuid.uuid4().hex[:8]}",
                                   protocol=mqtt.MQTTv5)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._worker = WorkerThread("controller-sim", self._run)

    def start(self, timeout_s: float = 5.0) -> None:
        # A session the broker keeps while we are away (a broker restart, a reconnect): with no
        # expiry it dies with the connection, and every verdict published until we are back
        # with it. Never a clean start: Mosquitto does not persist a session that began with
        # one. The client ID is ours alone, so there is no earlier run's session to resume.
        props = properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        self._client.connect(self._host, self._port, keepalive=10, clean_start=False,
                             properties=props)
        self._client.loop_start()
        if not self._connected.wait(timeout_s):
            raise RuntimeError(f"controller simulator: no connection to {self._host}:{self._port}")
        self._worker.start()

    def stop(self) -> None:
        self._worker.stop(2.0)
        self._client.loop_stop()
        bye = properties(PacketTypes.DISCONNECT)
        bye.SessionExpiryInterval = 0  # done: the broker need not keep anything for us
        self._client.disconnect(properties=bye)

    def _on_connect(self, client: mqtt.Client, _u: object, _f: object, rc: object,
                    _p: object = None) -> None:
        if getattr(rc, "is_failure", False):
            log.error("controller_connect_refused", reason=str(rc))
            return
        # On every connect: a broker that lost the session (no persistence) forgot it.
        client.subscribe(self.topics.verdict, qos=1)
        self._connected.set()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        try:
            payload = json.loads(msg.payload)
            key = (str(payload["node_id"]), int(payload["seq"]))
        except (ValueError, KeyError, TypeError):
            log.warning("controller_bad_verdict", payload=msg.payload[:200])
            return
        with self._lock:
            if key in self.received.by_key:
                self.received.duplicates += 1
                return
            self.received.by_key[key] = payload
            self.received.received_ms[key] = self._clock.now_ms()
        if self._on_verdict is not None:
            self._on_verdict(payload)

    def _run(self, stop: threading.Event) -> None:
        while not stop.wait(0.01):
            now = self._clock.now_ms()
            # Due by `now` (wall ms), past the ones already sent (they come in induct order).
            for ann in self._announcements(now, len(self.announced)):
                self.announced[ann.item_id] = ann
                body = {"schema_version": 1, "item_id": ann.item_id,
                        "product_id": ann.product_id, "induct_time_ms": ann.induct_time_ms}
                self._client.publish(self.topics.induct, json.dumps(body), qos=1)

    def verdict_count(self) -> int:
        with self._lock:
            return len(self.received.by_key)

    def actuations(self) -> dict[str, dict[str, object]]:
        with self._lock:
            return self.received.actuations()
