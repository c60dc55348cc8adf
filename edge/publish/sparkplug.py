"""Sparkplug B: the node as an edge node for SCADA, beside its MQTT verdict topic.

A `VerdictChannel` (edge.pipeline.routing): `offer` puts the verdict into a bounded queue and
returns at once (drops counted); the ``sparkplug`` thread owns its own paho client and does
everything else, so that seq, the births and the cameras' device state have one writer.

A session: the will is NDEATH with a fresh bdSeq (`BdSeqStore`, persisted before the connect),
then on CONNACK: subscribe to NCMD, NBIRTH (seq 0) with that bdSeq, a DBIRTH per streaming
camera, then NDATA per verdict and per health change, DDEATH/DBIRTH as cameras stop and come
back. Every NBIRTH, DBIRTH, NDATA and DDEATH carries the next seq (0..255, wrapping). An
NCMD `Node Control/Rebirth` = true republishes the births from seq 0. A clean stop publishes
the remaining verdicts and NDEATH before it disconnects. Connection rules (URL, TLS,
credentials, the plain-text refusal) are `edge.publish.connection`'s, as for the verdicts.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from edge import __version__
from edge.config import ConfigError
from edge.publish import sparkplug_payloads as sp
from edge.publish.connection import (
    describe_connect_error,
    load_credentials,
    parse_url,
    tls_context,
)
from edge.workers import WorkerThread

if TYPE_CHECKING:
    from edge.clock import Clock
    from edge.config import Config, MqttConfig, NodeConfig, SparkplugConfig
    from edge.types import Verdict

log = structlog.get_logger(__name__)

MT = sp.MessageType
#: The node's health (`Node.health()`) and its model versions, read on the channel's thread.
HealthSource = Callable[[], Mapping[str, object]]
VersionsSource = Callable[[], Mapping[str, str]]

BDSEQ_FILE = "sparkplug-bdseq"
#: How long the thread waits on the socket: also the most a queued verdict waits.
LOOP_S = 0.02
#: Verdicts published per turn of the loop, so that acks and commands are read in between.
VERDICTS_PER_TURN = 64


class SparkplugChannel:
    """Verdicts, health and cameras of one node as a Sparkplug B edge node with a device per
    camera. Thread-safe: `offer` and `metrics` from any thread."""

    backoff_min_s = 0.05
    backoff_max_s = 2.0

    def __init__(self, cfg: SparkplugConfig, mqtt: MqttConfig, node: NodeConfig,
                 state_dir: Path, clock: Clock, *,
                 environ: Mapping[str, str] | None = None) -> None:
        self._cfg = cfg
        #: the broker and its connection rules: the node's (`mqtt:`) unless `sparkplug.broker`
        self.broker = cfg.broker or mqtt
        self.group_id = cfg.group_id
        self.edge_node_id = cfg.edge_node_id or node.node_id
        self._info = {"version": __version__, "node_id": node.node_id, "line_id": node.line_id}
        self._clock = clock
        # The first broker of a failover list (Sparkplug's own session does not move).
        self._addr = parse_url(self.broker.urls[0])
        try:  # refuses credentials that would cross the network in clear text, unconnected
            self._credentials = load_credentials(self.broker, environ)
        except ConfigError as exc:
            if cfg.broker is None:
                raise
            raise ConfigError("sparkplug.broker" + exc.path.removeprefix("mqtt"), exc.value,
                              exc.expected) from None
        self._tls = tls_context(self.broker.tls) if self._addr.tls else None
        self._bd_store = sp.BdSeqStore(Path(state_dir) / BDSEQ_FILE)
        self._queue: queue.Queue[tuple[Verdict, int]] = queue.Queue(cfg.queue_size)
        self._lock = threading.Lock()  # the counters
        self._counts = dict.fromkeys(("queued", "dropped", "published", "births", "rebirths",
                                      "connects", "connect_failures"), 0)
        self._health: HealthSource | None = None
        self._versions: VersionsSource | None = None
        self._connected = threading.Event()
        self._rebirth = threading.Event()
        self._stop_timeout_s = 5.0
        # Owned by the thread: this session's bdSeq, seq, what was born and last published.
        self.bd_seq = -1
        self._seq = 0
        self._node_state: dict[str, sp.Value] = {}
        self._born_cameras: set[str] = set()
        self._retry: tuple[Verdict, int] | None = None
        self._read_failing = False
        self._worker = WorkerThread("sparkplug", self._run)
        self._client = self._make_client()

    @classmethod
    def from_config(cls, cfg: Config, clock: Clock) -> SparkplugChannel:
        """The channel `cfg.sparkplug` describes, on the node's broker unless it names one."""
        return cls(cfg.sparkplug, cfg.mqtt, cfg.node, cfg.storage.state_dir, clock)

    def watch(self, health: HealthSource, versions: VersionsSource | None = None) -> None:
        """Report this node's health, cameras and model versions (before `start`)."""
        self._health = health
        self._versions = versions

    # --- VerdictChannel --------------------------------------------------------------------

    def offer(self, verdict: Verdict, seq: int) -> None:
        """Queue one verdict for NDATA; never blocks (a full queue drops it, counted)."""
        try:
            self._queue.put_nowait((verdict, seq))
        except queue.Full:
            with self._lock:
                self._counts["dropped"] += 1
                dropped = self._counts["dropped"]
            if dropped == 1 or dropped % 1000 == 0:
                log.warning("sparkplug.verdict_dropped", item_id=verdict.item_id, seq=seq,
                            dropped=dropped, queue_size=self._cfg.queue_size)
            return
        with self._lock:
            self._counts["queued"] += 1

    def start(self) -> None:
        self._worker.start()
        log.info("sparkplug.starting", host=self._addr.host, port=self._addr.port,
                 tls=self._addr.tls, group_id=self.group_id, edge_node_id=self.edge_node_id)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Publish what is queued and NDEATH, then disconnect (a broker that is away gets
        neither: its will says the same)."""
        self._stop_timeout_s = timeout_s
        self._worker.stop(timeout_s + 1.0)
        left = self._queue.qsize()
        log.info("sparkplug.stopped", unpublished=left, **self.metrics())

    # --- state -----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def metrics(self) -> dict[str, int]:
        """Counters: verdicts queued, dropped (queue full) and published; births, rebirths."""
        with self._lock:
            return dict(self._counts)

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    # --- the thread ------------------------------------------------------------------------

    def _run(self, stop: threading.Event) -> None:
        self._new_session()
        backoff = self.backoff_min_s
        while not stop.is_set():
            try:
                self._client.reconnect()
            except Exception as exc:  # OSError, ssl errors, paho's ValueErrors: report, retry
                self._connect_failed(describe_connect_error(exc, self.broker))
            else:
                accepted = self._serve(stop)
                if accepted and not stop.is_set():
                    backoff = self.backoff_min_s
                    self._new_session()  # that session's will is spent or discarded
                    continue
            stop.wait(backoff)
            backoff = min(backoff * 2, self.backoff_max_s)

    def _new_session(self) -> None:
        """A new bdSeq, in the will the next CONNECT registers."""
        self.bd_seq = self._bd_store.claim()
        self._client.will_set(self._topic(MT.NDEATH), sp.ndeath(self._now(), self.bd_seq),
                              qos=1, retain=False)

    def _serve(self, stop: threading.Event) -> bool:
        """Run one connection until it drops or the channel stops; True if it was accepted."""
        accepted = False
        next_health = 0.0
        while self._client.loop(LOOP_S) == MQTTErrorCode.MQTT_ERR_SUCCESS:
            if not self._connected.is_set():
                if stop.is_set():  # still waiting for CONNACK
                    self._client.disconnect()
                    break
                continue
            if not accepted:
                accepted = True
                self._client.subscribe(self._topic(MT.NCMD), qos=1)  # before NBIRTH (spec)
                self._publish_births()
                next_health = time.monotonic() + self._cfg.health_interval_s
            if self._rebirth.is_set():
                self._rebirth.clear()
                self._count("rebirths")
                self._publish_births()
            if time.monotonic() >= next_health:
                next_health = time.monotonic() + self._cfg.health_interval_s
                self._publish_health()
            self._publish_verdicts(VERDICTS_PER_TURN)
            if stop.is_set():
                self._end_session()
                break
        self._connected.clear()
        return accepted

    def _end_session(self) -> None:
        """A clean stop: every queued verdict, then NDEATH (QoS 1, acknowledged), then
        DISCONNECT (which discards the will)."""
        deadline = time.monotonic() + self._stop_timeout_s
        while self._publish_verdicts(VERDICTS_PER_TURN) and time.monotonic() < deadline:
            self._client.loop(0)
        info = self._client.publish(self._topic(MT.NDEATH), sp.ndeath(self._now(), self.bd_seq),
                                    qos=1, retain=False)
        while not info.is_published() and time.monotonic() < deadline:
            if self._client.loop(LOOP_S) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return
        self._client.disconnect()
        with contextlib.suppress(Exception):  # flush the DISCONNECT; the socket may be gone
            self._client.loop(LOOP_S)

    # --- publishing (on the thread) ----------------------------------------------------------

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq = (seq + 1) % sp.SEQ_MODULO
        return seq

    def _publish(self, payload: bytes, kind: sp.MessageType, device: str | None = None,
                 ) -> bool:
        # QoS 0, not retained: what Sparkplug B says for births and data.
        info = self._client.publish(self._topic(kind, device), payload, qos=0, retain=False)
        return info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    def _publish_births(self) -> None:
        """NBIRTH (seq 0) with every node metric, then a DBIRTH per streaming camera."""
        health, values = self._read()
        self._seq = 0
        self._node_state = values or sp.node_values(None, {}, self._info,
                                                    self.metrics()["dropped"])
        self._publish(sp.nbirth(self._now(), self.bd_seq, self._node_state), MT.NBIRTH)
        self._next_seq()
        self._born_cameras = set()
        for cid, state in sorted(sp.camera_states(health).items()):
            if state == "streaming":
                self._publish(sp.dbirth(self._now(), self._next_seq(), state), MT.DBIRTH, cid)
                self._born_cameras.add(cid)
        self._count("births")
        log.info("sparkplug.born", bd_seq=self.bd_seq, cameras=sorted(self._born_cameras))

    def _publish_health(self) -> None:
        """Node metrics that changed (NDATA), cameras that stopped (DDEATH) or came back
        (DBIRTH). A metric the births did not declare (a new model) needs a rebirth."""
        health, values = self._read()
        if not values:
            return
        if values.keys() != self._node_state.keys():
            self._publish_births()
            return
        changed = {k: v for k, v in values.items() if self._node_state[k] != v}
        if changed:
            self._publish(sp.ndata(self._now(), self._next_seq(), changed), MT.NDATA)
            self._node_state = values
        cameras = sp.camera_states(health)
        for cid in sorted(self._born_cameras - {c for c, s in cameras.items()
                                                if s == "streaming"}):
            self._publish(sp.ddeath(self._now(), self._next_seq()), MT.DDEATH, cid)
            self._born_cameras.discard(cid)
            log.info("sparkplug.device_death", camera=cid, state=cameras.get(cid, "gone"))
        for cid, state in sorted(cameras.items()):
            if state == "streaming" and cid not in self._born_cameras:
                self._publish(sp.dbirth(self._now(), self._next_seq(), state), MT.DBIRTH, cid)
                self._born_cameras.add(cid)
                log.info("sparkplug.device_birth", camera=cid)

    def _publish_verdicts(self, limit: int) -> int:
        """Up to `limit` queued verdicts as NDATA, one each; returns how many."""
        sent = 0
        while sent < limit:
            item = self._retry
            if item is None:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            verdict, seq = item
            payload = sp.ndata(self._now(), self._seq, sp.verdict_values(verdict, seq),
                               metric_ts=int(verdict.decided_ms))
            if not self._publish(payload, MT.NDATA):
                self._retry = item  # the connection is gone: next session, after its births
                break
            self._retry = None
            self._next_seq()
            sent += 1
        self._count("published", sent)
        return sent

    def _read(self) -> tuple[Mapping[str, object] | None, dict[str, sp.Value]]:
        """The node's health and its metrics now; None and {} once a source failed, which
        is logged once per run of failures."""
        try:
            health = self._health() if self._health is not None else None
            versions = self._versions() if self._versions is not None else {}
        except Exception:  # a broken source costs the health metrics, never the verdicts
            if not self._read_failing:
                log.exception("sparkplug.health_failed")
            self._read_failing = True
            return None, {}
        self._read_failing = False
        return health, sp.node_values(health, versions, self._info, self.metrics()["dropped"])

    # --- paho plumbing ---------------------------------------------------------------------

    def _now(self) -> int:
        return int(self._clock.now_ms())

    def _topic(self, kind: sp.MessageType, device: str | None = None) -> str:
        return sp.topic(self.group_id, kind, self.edge_node_id, device)

    def _make_client(self) -> paho.Client:
        # Sparkplug B sessions are clean (no session state survives a disconnect). MQTT 5 only
        # when asked for: "auto" means 3.1.1, which every Sparkplug host speaks.
        v5 = self.broker.protocol == "5"
        client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=self._cfg.client_id or f"cv-spb-{self.edge_node_id}",
                             protocol=MQTTProtocolVersion.MQTTv5 if v5
                             else MQTTProtocolVersion.MQTTv311,
                             clean_session=None if v5 else True, reconnect_on_failure=False)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        if self._credentials is not None:
            client.username_pw_set(self._credentials.username, self._credentials.password)
        if self._tls is not None:
            client.tls_set_context(self._tls)
        if v5:
            client.connect_async(self._addr.host, self._addr.port, self.broker.keepalive_s,
                                 clean_start=True)
        else:
            client.connect_async(self._addr.host, self._addr.port, self.broker.keepalive_s)
        return client

    def _connect_failed(self, message: str) -> None:
        with self._lock:
            self._counts["connect_failures"] += 1
            first = self._counts["connect_failures"] == 1
        (log.error if first else log.debug)("sparkplug.connect_failed", error=message)

    def _on_connect(self, _client: paho.Client, _userdata: Any, _flags: Any, reason: Any,
                    _props: Any) -> None:
        if reason.is_failure:
            self._connect_failed(f"broker refused the connection: {reason}")
            return
        self._count("connects")
        self._connected.set()
        log.info("sparkplug.connected", bd_seq=self.bd_seq)

    def _on_disconnect(self, _client: paho.Client, _userdata: Any, _flags: Any, reason: Any,
                       _props: Any) -> None:
        if self._connected.is_set():
            log.info("sparkplug.disconnected", reason=str(reason))
        self._connected.clear()

    def _on_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            wanted = sp.rebirth_requested(bytes(msg.payload))
        except Exception as exc:  # a host's bad command must not stop the channel
            log.warning("sparkplug.bad_command", topic=msg.topic, error=str(exc)[:200])
            return
        if wanted:
            self._rebirth.set()  # answered by the thread's loop, outside paho's callback
