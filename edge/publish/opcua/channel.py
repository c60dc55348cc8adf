"""`OpcUaChannel`: the node's verdicts for PLCs and SCADA, served over OPC UA.

It is a `VerdictChannel` (edge.pipeline.routing) by its shape: `offer` (on the scheduler's
hot path: a bounded append, never a wait), `start`, `stop`. The server itself runs on the
channel's own thread and asyncio loop (`loop.ServerLoop`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from edge.clock import Clock
from edge.config import NodeConfig, OpcUaConfig
from edge.publish.opcua.contract import VisionState
from edge.publish.opcua.loop import ServerLoop
from edge.publish.opcua.security import Users, load_users
from edge.publish.opcua.server import EventSink, Inbox, Stats, quiet_asyncua_logs
from edge.types import Verdict
from edge.workers import WorkerThread


class OpcUaChannel:
    """An OPC UA server showing every verdict (docs/opcua.md)."""

    def __init__(self, cfg: OpcUaConfig, node: NodeConfig, clock: Clock, *,
                 publish_event: EventSink | None = None, users: Users | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        """Raises ConfigError when the users cannot be read or nobody could log in."""
        self.cfg = cfg
        self.stats = Stats()
        self._inbox = Inbox(cfg.queue_size, self.stats)
        self._publish_event = publish_event
        self._state: Callable[[], VisionState] | None = None
        self._loop = ServerLoop(cfg, node, clock, self._inbox, self.stats,
                                users if users is not None else load_users(cfg, environ),
                                publish_event=lambda: self._publish_event,
                                state=lambda: self._state)
        self._worker = WorkerThread("opcua", self._loop.run, wake=self._wake)

    def attach(self, publish_event: EventSink | None = None,
               registry: CollectorRegistry | None = None,
               state: Callable[[], VisionState] | None = None) -> None:
        """What exists only once the node is built: its `…/events`, its metrics registry and
        its state (read once a second on the server's thread)."""
        if publish_event is not None:
            self._publish_event = publish_event
        if state is not None:
            self._state = state
        if registry is not None:
            registry.register(_OpcUaCollector(self))

    # --- VerdictChannel -----------------------------------------------------------------

    def offer(self, verdict: Verdict, seq: int) -> None:
        self._inbox.put(verdict, seq)

    def start(self) -> None:
        """Starts the server's thread and returns: the server listens a few seconds later
        (asyncua builds its standard address space first); `wait_ready` waits for that."""
        quiet_asyncua_logs()
        self._worker.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """The block's handshake goes on for most of `timeout_s`, then the server closes."""
        self._loop.stop_by = time.monotonic() + 0.8 * timeout_s
        self._worker.stop(timeout_s)

    # --- for the demo, the tests and the tools ------------------------------------------

    def wait_ready(self, timeout_s: float) -> bool:
        """Whether the server listens (False: not yet, or it failed: see `failed`)."""
        return self._loop.ready.wait(timeout_s) and self.stats.up

    @property
    def failed(self) -> BaseException | None:
        return self._loop.failed

    @property
    def clients(self) -> int:
        """Client connections, as of the last second."""
        return self.stats.clients

    @property
    def queue_depth(self) -> int:
        return len(self._inbox)

    @property
    def endpoint_url(self) -> str:
        host = f"[{self.cfg.bind}]" if ":" in self.cfg.bind else self.cfg.bind
        return f"opc.tcp://{host}:{self.cfg.port}/"

    def _wake(self) -> None:
        self._inbox.signal.set()  # the loop wakes, sees the stop event, finishes


class _OpcUaCollector(Collector):
    def __init__(self, channel: OpcUaChannel) -> None:
        self._channel = channel

    def collect(self) -> Iterator[Metric]:
        st = self._channel.stats
        yield GaugeMetricFamily("cv_opcua_up", "OPC UA server listening (1) or not (0)",
                                value=1.0 if st.up else 0.0)
        yield GaugeMetricFamily("cv_opcua_clients", "OPC UA client connections",
                                value=st.clients)
        yield GaugeMetricFamily("cv_opcua_queue_depth", "Verdicts waiting for the OPC UA "
                                "server's thread", value=self._channel.queue_depth)
        for name, doc, value in (
                ("cv_opcua_results", "Verdicts the OPC UA server showed", st.results),
                ("cv_opcua_dropped", "Verdicts dropped: the OPC UA server's queue was full",
                 st.dropped),
                ("cv_opcua_acked", "Results the PLC acknowledged in time", st.acked),
                ("cv_opcua_late_acks", "Acknowledgements after the result was withdrawn",
                 st.late_acks),
                ("cv_opcua_writes_refused", "Client writes refused", st.writes_refused),
                ("cv_opcua_logins_refused", "Sessions refused: user, password or channel",
                 st.logins_refused),
                ("cv_opcua_connections_refused", "Connections closed at once: over "
                 "opcua.connects_per_s", st.connections_refused),
                ("cv_opcua_errors", "Server steps that raised (logged)", st.errors),
                ("cv_opcua_certificates_refused", "Client certificates refused",
                 st.certificates_refused)):
            yield CounterMetricFamily(name, doc, value=value)
        missed = CounterMetricFamily("cv_opcua_results_missed", "Results the PLC did not "
                                     "acknowledge before their deadline or ack timeout",
                                     labels=["why"])
        for why, n in sorted(st.missed.items()):
            missed.add_metric([why], n)
        yield missed
