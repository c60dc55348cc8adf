"""The node's MQTT client: verdicts out (through the durable outbox), inductions and feedback in.

paho-mqtt 2 with MQTT 5 (falls back to 3.1.1 when the broker refuses 5 and
``mqtt.protocol`` is ``auto``), QoS 1 and a persistent session. The network
loop runs in one named thread that owns connecting, so a refused CONNACK is
never mistaken for a connection and a TLS failure is reported with its cause
(`last_error`). Every connect publishes a retained ``online`` status, subscribes
to the inputs and re-sends unacknowledged outbox rows that paho does not hold
in memory (paho itself re-sends its in-flight messages). PUBACKs travel from
paho's thread through a queue to the ``mqtt-acks`` thread, which marks the
outbox rows done: paho calls `on_publish` with its own locks held.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes

from edge import __version__
from edge.publish.connection import (
    BrokerAddress,
    describe_connect_error,
    load_credentials,
    parse_url,
    tls_context,
)
from edge.publish.counters import AckedVerdict, PublisherMetrics
from edge.publish.delivery import MAX_QUEUED, Delivery, properties
from edge.publish.inputs import InputGate
from edge.publish.outbox import Outbox
from edge.publish.payloads import dumps, event_payload, status_payload, verdict_payload
from edge.publish.topics import Topics
from edge.workers import WorkerThread

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Mapping
    from pathlib import Path

    from edge.clock import Clock
    from edge.config import MqttConfig, NodeConfig
    from edge.publish.payloads import InputRejected
    from edge.types import Announcement, Feedback, Verdict

log = structlog.get_logger(__name__)

__all__ = ["AckedVerdict", "PublisherMetrics", "VerdictPublisher"]

SESSION_EXPIRY_S = 24 * 3600
TOP_UP_INTERVAL_S = 1.0
_UNSUPPORTED_PROTOCOL = 132


class VerdictPublisher:
    """Publishes verdicts durably and delivers inductions and feedback to the node.

    Threads: ``mqtt-net`` (socket I/O, reconnects; calls `on_announcement` and
    `on_feedback`, which must return quickly) and ``mqtt-acks`` (outbox
    bookkeeping; calls `on_acked`). `publish_verdict`, `publish_status` and
    `publish_event` may be called from any thread. `known_products` enables the
    unknown-product check on inputs; `health` (optional) is polled every
    ``mqtt.status_interval_s`` for the retained status; `versions` go into it.
    """

    backoff_min_s = 0.05
    backoff_max_s = 2.0

    def __init__(
        self, mqtt_cfg: MqttConfig, node_cfg: NodeConfig, outbox_path: Path, clock: Clock,
        on_announcement: Callable[[Announcement], None], on_feedback: Callable[[Feedback], None],
        on_acked: Callable[[AckedVerdict], None] | None = None, *,
        known_products: Collection[str] | None = None, versions: Mapping[str, str] | None = None,
        outbox_max_rows: int = 100_000, environ: Mapping[str, str] | None = None,
        health: Callable[[], Mapping[str, object]] | None = None,
    ) -> None:
        self._cfg = mqtt_cfg
        self._node = node_cfg
        self._clock = clock
        self.topics = Topics(mqtt_cfg.topic_prefix, node_cfg.line_id, node_cfg.node_id)
        # Brokers in the order they are tried: a failover list moves on to the next broker
        # when one goes away (or never answers); a single one is reconnected to.
        self._addrs = [parse_url(url) for url in mqtt_cfg.urls]
        self._broker = 0
        self._credentials = load_credentials(mqtt_cfg, environ)
        self._tls = tls_context(mqtt_cfg.tls) if self._addr.tls else None
        self._versions = {"node": __version__, **(versions or {})}
        self._health: dict[str, object] = {}
        self._health_provider = health
        self._outbox = Outbox(outbox_path, outbox_max_rows)
        self._gate = InputGate(self.topics, clock, on_announcement=on_announcement,
                               on_feedback=on_feedback, report=self._report,
                               known_products=known_products, item_known=self._outbox.has_item)
        self._protocol = (MQTTProtocolVersion.MQTTv311 if mqtt_cfg.protocol == "3.1.1"
                          else MQTTProtocolVersion.MQTTv5)
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._lock = threading.Lock()  # the counters
        self._counts = dict.fromkeys(("published", "reconnects", "connect_failures", "events",
                                      "connects", "failovers"), 0)
        self._delivery = Delivery(self._outbox, clock, lambda: self._client,
                                  lambda: self._protocol == MQTTProtocolVersion.MQTTv5, on_acked)
        self._last_error: str | None = None
        self._fallback = False
        self._closing = False
        self._connack_seen = False
        # `_stop` is also the "stopping" flag the network loop and `stop()` read.
        self._network = WorkerThread("mqtt-net", self._run_network, stop_event=self._stop)
        self._final_metrics: PublisherMetrics | None = None
        self._client = self._make_client()

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        self._delivery.start()
        self._network.start()
        log.info("mqtt.starting", host=self._addr.host, port=self._addr.port, tls=self._addr.tls,
                 client_id=self._client_id, root=self.topics.root,
                 credentials=repr(self._credentials) if self._credentials else None,
                 outbox_unacked=self._outbox.unacked)

    def stop(self, flush_timeout_s: float = 5.0) -> int:
        """Flush the outbox (up to the timeout), publish `offline`, disconnect.

        Returns how many verdicts are still unacknowledged (they stay in the
        outbox and are re-sent by the next start).
        """
        if self._stop.is_set():
            return self._outbox.unacked
        self._closing = True
        deadline = self._clock_s() + flush_timeout_s
        while self._outbox.unacked and self._connected.is_set() and self._clock_s() < deadline:
            self._stop.wait(0.01)
        if self._connected.is_set():
            info = self._client.publish(self.topics.status, self._status_bytes("offline"),
                                        qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):  # best effort: the will covers it
                info.wait_for_publish(max(0.1, deadline - self._clock_s()))
            self._client.disconnect()
            end = self._clock_s() + 1.0
            while self._connected.is_set() and self._clock_s() < end:
                self._stop.wait(0.01)
        self._network.stop(5.0)
        self._delivery.stop()
        left = self._outbox.unacked
        self._final_metrics = self.metrics()  # what a summary reads after the stop
        self._outbox.close()
        log.info("mqtt.stopped", unacked=left)
        return left

    @staticmethod
    def _clock_s() -> float:
        return time.monotonic()  # timeouts run on real time, whatever the node's clock does

    def wait_connected(self, timeout_s: float) -> bool:
        """Wait until connected *and* subscribed to the inputs (SUBACK received)."""
        return self._subscribed.wait(timeout_s) and self._connected.is_set()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def outbox_depth(self) -> int:
        return self._outbox.unacked

    @property
    def last_error(self) -> str | None:
        return self._last_error

    # --- publishing ---------------------------------------------------------------------

    def publish_verdict(self, verdict: Verdict) -> int:
        """Store the verdict in the outbox, then publish it; returns its sequence number."""
        now = self._clock.now_ms()

        def render(seq: int) -> bytes:
            return dumps(verdict_payload(verdict, node_id=self._node.node_id,
                                         line_id=self._node.line_id, seq=seq, published_ms=now))

        dropped = self._outbox.dropped_expired + self._outbox.dropped_actionable
        was_failing = self._outbox.write_failing
        row = self._outbox.append(
            item_id=verdict.item_id, topic=self.topics.verdict, deadline_ms=verdict.deadline_ms,
            captured_ms=verdict.captured_ms, decided_ms=verdict.decided_ms, published_ms=now,
            now_ms=now, render=render)
        self._gate.remember(verdict.item_id)
        with self._lock:
            self._counts["published"] += 1
        self._delivery.send(row)
        if self._outbox.write_failing and not was_failing:  # once per run of failures
            self.publish_event("outbox_write_failed", {
                "seq": row.seq, "unpersisted": self._outbox.unpersisted,
                "outbox": str(self._outbox.path)})
        if self._outbox.dropped_expired + self._outbox.dropped_actionable > dropped:
            self.publish_event("outbox_dropped", {
                "dropped_expired": self._outbox.dropped_expired,
                "dropped_actionable": self._outbox.dropped_actionable,
                "max_rows": self._outbox.max_rows})
        return row.seq

    def set_versions(self, versions: Mapping[str, str]) -> None:
        """After a reload: the status names the models now in use (from the next status on)."""
        self._versions = {"node": __version__, **versions}

    def publish_status(self, health: Mapping[str, object]) -> None:
        """Publish (retained) `online` with this health; it is re-published on every connect."""
        self._health = dict(health)
        if self._connected.is_set():
            self._client.publish(self.topics.status, self._status_bytes("online"), qos=1,
                                 retain=True)

    def publish_event(self, kind: str, detail: Mapping[str, object]) -> None:
        payload = dumps(event_payload(kind, detail, node_id=self._node.node_id,
                                      line_id=self._node.line_id, now_ms=self._clock.now_ms()))
        self._client.publish(self.topics.events, payload, qos=1, retain=False)
        with self._lock:
            self._counts["events"] += 1

    def publish_message(self, topic: str, payload: bytes) -> bool:
        """A message that may be lost (shadow scores): QoS 0, only while connected, never
        stored in the outbox and never resent; it shares paho's outgoing queue with the
        verdicts, behind those already handed over. False when it was not handed to paho."""
        if not self._connected.is_set():
            return False
        return self._client.publish(topic, payload, qos=0, retain=False).rc == (
            MQTTErrorCode.MQTT_ERR_SUCCESS)

    def _status_bytes(self, state: str) -> bytes:
        return dumps(status_payload(state, node_id=self._node.node_id,
                                    line_id=self._node.line_id, now_ms=self._clock.now_ms(),
                                    versions=self._versions,
                                    health=self._health if state == "online" else {}))

    def _report(self, topic: str, exc: InputRejected, size: int) -> None:
        self.publish_event("rejected_input", {"topic": topic, "reason": exc.reason,
                                              "field": exc.field, "error": str(exc)[:300],
                                              "size": size})

    # --- paho plumbing ------------------------------------------------------------------

    @property
    def _client_id(self) -> str:
        return self._cfg.client_id or f"cv-{self._node.node_id}"

    def _make_client(self) -> paho.Client:
        v5 = self._protocol == MQTTProtocolVersion.MQTTv5
        client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=self._client_id, protocol=self._protocol,
                             clean_session=None if v5 else False, reconnect_on_failure=False)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._delivery.on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        # Never write from the caller's thread: the mqtt-net thread does all socket I/O.
        client.on_socket_register_write = lambda *_: None
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(MAX_QUEUED)  # beyond this, verdicts wait in the outbox
        if self._credentials is not None:
            client.username_pw_set(self._credentials.username, self._credentials.password)
        if self._tls is not None:
            client.tls_set_context(self._tls)
        client.will_set(self.topics.status, self._status_bytes("offline"), qos=1, retain=True)
        if v5:
            props = properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_EXPIRY_S
            client.connect_async(self._addr.host, self._addr.port, self._cfg.keepalive_s,
                                 clean_start=False, properties=props)
        else:
            client.connect_async(self._addr.host, self._addr.port, self._cfg.keepalive_s)
        return client

    @property
    def _addr(self) -> BrokerAddress:
        return self._addrs[self._broker]

    def _run_network(self, _stop: threading.Event) -> None:
        backoff = self.backoff_min_s
        while not self._stop.is_set():
            if self._fallback:
                self._fall_back_to_311()
            try:
                self._client.reconnect()
            except Exception as exc:  # OSError, ssl errors, paho's ValueErrors: report, retry
                self._connect_failed(describe_connect_error(exc, self._cfg))
                self._fail_over()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.backoff_max_s)
                continue
            if self._serve_connection():
                backoff = self.backoff_min_s
            self._connected.clear()
            self._subscribed.clear()
            if not self._stop.is_set():
                self._fail_over()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.backoff_max_s)

    def _fail_over(self) -> None:
        """With more than one broker: the next one, on a new client. The verdicts in flight
        to the old broker are forgotten, so the outbox sends every unacknowledged one again
        (same seq) to the new broker: none is lost, duplicates carry the seq they had."""
        if len(self._addrs) < 2 or self._stop.is_set() or self._closing:
            return  # (a clean stop's own disconnect is no broker going away)
        old = self._addr
        self._broker = (self._broker + 1) % len(self._addrs)
        with self._lock:
            self._counts["failovers"] += 1
        log.warning("mqtt.failover", from_broker=f"{old.host}:{old.port}",
                    to=f"{self._addr.host}:{self._addr.port}")

        def replace() -> None:
            self._client = self._make_client()

        self._delivery.forget_in_flight(replace)

    def _serve_connection(self) -> bool:
        """Run one connection until it drops; True if the broker accepted it."""
        self._connack_seen = False
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        accepted = False
        now = time.monotonic()
        next_status, next_top_up = now + self._cfg.status_interval_s, now + TOP_UP_INTERVAL_S
        while not self._stop.is_set():
            rc = self._client.loop(0.05)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
            if not self._connected.is_set():
                continue
            accepted = True
            now = time.monotonic()
            if now >= next_top_up:
                next_top_up = now + TOP_UP_INTERVAL_S
                self._delivery.top_up()
            if now >= next_status:
                next_status = now + self._cfg.status_interval_s
                self._refresh_health()
        if not self._connack_seen and not self._stop.is_set():
            hint = " (TLS: does the broker require a client certificate, " \
                "mqtt.tls.cert_file?)" if self._addr.tls else ""
            self._connect_failed(f"the broker closed the connection before CONNACK "
                                 f"({paho.error_string(rc)}){hint}")
        return accepted

    def _refresh_health(self) -> None:
        if self._health_provider is None:
            return
        try:
            health = self._health_provider()
        except Exception:
            log.exception("mqtt.health_provider_failed")
            return
        self.publish_status(health)

    def _connect_failed(self, message: str) -> None:
        with self._lock:
            self._counts["connect_failures"] += 1
            first = self._last_error != message
        self._last_error = message
        (log.error if first else log.debug)("mqtt.connect_failed", error=message)

    def _fall_back_to_311(self) -> None:
        log.warning("mqtt.protocol_fallback", to="3.1.1")
        self._fallback = False
        self._protocol = MQTTProtocolVersion.MQTTv311

        def replace() -> None:
            self._client = self._make_client()

        self._delivery.forget_in_flight(replace)

    def _on_connect(self, client: paho.Client, _userdata: Any, flags: paho.ConnectFlags,
                    reason: Any, _props: Any) -> None:
        self._connack_seen = True
        if reason.is_failure:
            if (reason.value == _UNSUPPORTED_PROTOCOL and self._cfg.protocol == "auto"
                    and self._protocol == MQTTProtocolVersion.MQTTv5):
                self._fallback = True
            self._connect_failed(f"broker refused the connection: {reason}")
            return
        with self._lock:
            self._counts["connects"] += 1
            if self._counts["connects"] > 1:
                self._counts["reconnects"] += 1
        self._last_error = None
        self._connected.set()
        log.info("mqtt.connected", session_present=flags.session_present,
                 protocol="5" if self._protocol == MQTTProtocolVersion.MQTTv5 else "3.1.1")
        client.publish(self.topics.status, self._status_bytes("online"), qos=1, retain=True)
        client.subscribe([(t, 1) for t in self.topics.inputs])
        self._delivery.resend_pending(reconnected=True)

    def _on_disconnect(self, _client: paho.Client, _userdata: Any, _flags: Any, reason: Any,
                       _props: Any) -> None:
        if self._connected.is_set():
            (log.info if self._closing else log.warning)("mqtt.disconnected", reason=str(reason))
        self._connected.clear()
        self._subscribed.clear()

    def _on_subscribe(self, _client: paho.Client, _userdata: Any, _mid: int,
                      reasons: list[Any], _props: Any) -> None:
        refused = [str(r) for r in reasons if r.is_failure]
        if refused:  # e.g. an ACL without read rights: inputs will not arrive
            log.error("mqtt.subscribe_refused", topics=self.topics.inputs, reasons=refused)
        self._subscribed.set()

    def _on_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        self._gate.handle(msg.topic, bytes(msg.payload))

    def metrics(self) -> PublisherMetrics:
        """The delivery counters; after `stop()`, as they were when it closed the outbox."""
        if self._final_metrics is not None:
            return self._final_metrics
        received, accepted, rejected = self._gate.snapshot()
        stats = self._outbox.stats()
        with self._lock:
            c = dict(self._counts)
        c.update(self._delivery.snapshot())
        return PublisherMetrics(
            connected=self.connected,
            protocol="5" if self._protocol == MQTTProtocolVersion.MQTTv5 else "3.1.1",
            published=c["published"], acked=c.get("acked", 0), resent=c.get("resent", 0),
            refused=c.get("refused", 0), reconnects=c["reconnects"],
            connect_failures=c["connect_failures"], events_published=c["events"],
            outbox_depth=stats.unacked, dropped_expired=stats.dropped_expired,
            dropped_actionable=stats.dropped_actionable,
            outbox_unpersisted=self._outbox.unpersisted, inputs_received=received,
            accepted=accepted, rejected=rejected, last_error=self._last_error,
            acks_not_recorded=c.get("acks_not_recorded", 0), failovers=c["failovers"])
