"""A client of the site's broker for what the nodes share (the shared gallery): a paho client
of its own, on its own network thread (`loop_start`), so that it never holds up the verdicts'
client.

It follows the node's connection rules (`edge.publish.connection`): the URLs of `mqtt.url`
as a failover list (the first that answers; the next when one goes away or never answers),
TLS, and credentials, refused in clear text beyond loopback. Sessions are clean: every connect
subscribes again, and the broker then sends the retained messages again, which is how a node
catches up. `on_message` runs on paho's network thread and must return quickly.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from edge.config import MqttConfig
from edge.publish.connection import load_credentials, parse_url, tls_context

log = structlog.get_logger(__name__)

#: paho's wait between connection attempts grows from the first to the second (seconds).
RECONNECT_DELAY_S = (1, 16)


class SiteClient:
    """Subscribes to `subscriptions` (QoS 1) on every connect; publishes from any thread."""

    def __init__(self, mqtt: MqttConfig, client_id: str, subscriptions: Sequence[str],
                 on_message: Callable[[str, bytes], None], *,
                 environ: Mapping[str, str] | None = None) -> None:
        self._cfg = mqtt
        self._addrs = [parse_url(url) for url in mqtt.urls]
        self._broker = 0
        credentials = load_credentials(mqtt, environ)  # refuses clear text, unconnected
        self._subscriptions = tuple(subscriptions)
        self._on_message_cb = on_message
        self._v5 = mqtt.protocol != "3.1.1"
        self._stopping = False
        self._connected = threading.Event()
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(("connects", "connect_failures", "failovers"), 0)
        self._last_error: str | None = None
        self.client_id = client_id
        client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=client_id,
                             protocol=MQTTProtocolVersion.MQTTv5 if self._v5
                             else MQTTProtocolVersion.MQTTv311,
                             clean_session=None if self._v5 else True)
        client.reconnect_delay_set(*RECONNECT_DELAY_S)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        if credentials is not None:
            client.username_pw_set(credentials.username, credentials.password)
        if self._addrs[0].tls:
            client.tls_set_context(tls_context(mqtt.tls))
        self._client = client

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def start(self) -> None:
        self._connect_to(self._broker)
        self._client.loop_start()
        addr = self._addrs[self._broker]
        log.info("site.client_starting", host=addr.host, port=addr.port, tls=addr.tls,
                 client_id=self.client_id, subscriptions=list(self._subscriptions))

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def publish(self, topic: str, payload: bytes, *, retain: bool) -> paho.MQTTMessageInfo:
        """QoS 1; queued by paho while the broker is away (sent on the next connect)."""
        return self._client.publish(topic, payload, qos=1, retain=retain)

    def resubscribe(self) -> None:
        """Subscribe again: the broker sends every retained message under the filters anew."""
        if self._connected.is_set():
            self._client.subscribe([(s, 1) for s in self._subscriptions])

    def stop(self) -> None:
        self._stopping = True
        if self._connected.is_set():
            self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()

    # --- paho's network thread ----------------------------------------------------------

    def _connect_to(self, index: int) -> None:
        addr = self._addrs[index]
        self._broker = index
        self._client.connect_async(addr.host, addr.port, self._cfg.keepalive_s,
                                   clean_start=True if self._v5 else
                                   paho.MQTT_CLEAN_START_FIRST_ONLY)

    def _fail_over(self) -> None:
        """The next broker of the list; paho connects to it after its reconnect delay."""
        if len(self._addrs) < 2 or self._stopping:
            return
        old = self._addrs[self._broker]
        self._connect_to((self._broker + 1) % len(self._addrs))
        new = self._addrs[self._broker]
        with self._lock:
            self._counts["failovers"] += 1
        log.warning("site.client_failover", from_broker=f"{old.host}:{old.port}",
                    to=f"{new.host}:{new.port}")

    def _failed(self, message: str) -> None:
        with self._lock:
            self._counts["connect_failures"] += 1
        first, self._last_error = self._last_error != message, message
        (log.error if first else log.debug)("site.client_connect_failed", error=message)

    def _on_connect(self, client: paho.Client, _userdata: Any, _flags: Any, reason: Any,
                    _props: Any) -> None:
        if reason.is_failure:
            self._failed(f"broker refused the connection: {reason}")
            return
        self._last_error = None
        with self._lock:
            self._counts["connects"] += 1
        self._connected.set()
        rc, _ = client.subscribe([(s, 1) for s in self._subscriptions])
        log.info("site.client_connected", subscribed=rc == MQTTErrorCode.MQTT_ERR_SUCCESS)

    def _on_connect_fail(self, _client: paho.Client, _userdata: Any) -> None:
        addr = self._addrs[self._broker]
        self._failed(f"cannot reach the broker at {addr.host}:{addr.port}")
        self._fail_over()

    def _on_disconnect(self, _client: paho.Client, _userdata: Any, _flags: Any, reason: Any,
                       _props: Any) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if self._stopping:
            return
        if was:
            log.warning("site.client_disconnected", reason=str(reason))
        self._fail_over()

    def _on_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            self._on_message_cb(msg.topic, bytes(msg.payload))
        except Exception:  # one bad message must not end paho's network thread
            log.exception("site.client_message_failed", topic=msg.topic)
