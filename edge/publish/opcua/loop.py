"""The server loop: verdicts in, results out, the PLC handshake, the vision system's state.

Runs on the channel's own thread (`ServerLoop.run`), in its own asyncio loop; every asyncua
object is created and used there only.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable

import structlog
from asyncua import Server, ua

from edge.clock import Clock
from edge.config import NodeConfig, OpcUaConfig
from edge.publish.opcua import contract as c
from edge.publish.opcua.address_space import (
    Nodes,
    build_address_space,
    method_result,
    result_outputs,
    status,
)
from edge.publish.opcua.contract import VisionState
from edge.publish.opcua.handshake import Ack, Missed, PlcHandshake, Step
from edge.publish.opcua.results import Result, ResultStore, result_from_verdict
from edge.publish.opcua.security import Users
from edge.publish.opcua.server import (
    MISSED_EVENT_INTERVAL_S,
    STATE_INTERVAL_S,
    EventSink,
    Inbox,
    Stats,
    check_ack_value,
    gate_connections,
    guard_ack_writes,
    make_server,
)

log = structlog.get_logger(__name__)

#: The PLC block's copy of a result, but Seq (written after them).
_PLC_DATA_FIELDS = tuple(f for f in c.PLC_FIELDS
                         if f.name not in ("Seq", "ResultValid", "ResultAck", "Missed"))


class ServerLoop:
    def __init__(self, cfg: OpcUaConfig, node: NodeConfig, clock: Clock, inbox: Inbox,
                 stats: Stats, users: Users, *, publish_event: Callable[[], EventSink | None],
                 state: Callable[[], Callable[[], VisionState] | None]) -> None:
        self.cfg = cfg
        self.node = node
        self.clock = clock
        self.inbox = inbox
        self.stats = stats
        self.users = users
        # Looked up when used: the node hands them over (`attach`) once it is built.
        self._publish_event = publish_event
        self._state = state
        self.store = ResultStore(cfg.results_kept)
        self.handshake = PlcHandshake(required=cfg.handshake, ack_timeout_ms=cfg.ack_timeout_ms)
        self.ready = threading.Event()
        self.failed: BaseException | None = None
        #: monotonic time by which the loop must have finished stopping
        self.stop_by = float("inf")
        self._wake: asyncio.Event | None = None
        #: the server's event loop, while it runs
        self.loop: asyncio.AbstractEventLoop | None = None
        self._nodes: Nodes | None = None
        self._server: Server | None = None
        self._shown_valid = False
        self._last_state: tuple[object, ...] | None = None
        self._next_state_mono = 0.0
        self._missed_unreported: list[Missed] = []
        self._missed_reported_mono = 0.0

    # --- thread and loop ----------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """The channel thread's target."""
        try:
            asyncio.run(self._main(stop))
        except Exception as exc:  # logged and shown in the metrics (cv_opcua_up 0)
            self.failed = exc
            log.error("opcua_server_failed", error=str(exc), port=self.cfg.port)
        finally:
            self.stats.up = False
            self.ready.set()

    async def _main(self, stop: threading.Event) -> None:
        loop = self.loop = asyncio.get_running_loop()
        wake = self._wake = asyncio.Event()
        server = self._server = await make_server(self.cfg, self.node, self.users, self.stats)
        nodes = self._nodes = await build_address_space(server, self.cfg.namespace_uri,
                                                        self._get_result)
        guard_ack_writes(server, nodes, self._on_ack, self.stats)
        await server.start()
        gate_connections(server, self.cfg.connects_per_s, self.stats)
        done = threading.Event()
        relay = threading.Thread(target=self._relay, args=(loop, wake, done),
                                 name="opcua-wake", daemon=True)
        relay.start()
        self.stats.up = True
        self.ready.set()
        log.info("opcua_server_started", endpoint=server.endpoint.geturl(),
                 security=list(self.cfg.security), namespace=self.cfg.namespace_uri)
        try:
            while not stop.is_set():
                await self._wait()
                try:
                    await self._process(nodes)
                except Exception:  # a bug costs the verdicts in hand, not the server
                    self.stats.errors += 1
                    log.exception("opcua_step_failed")
            await self._finish(nodes)
        finally:
            done.set()
            self.inbox.signal.set()  # the relay sees `done` and ends
            self.stats.up = False
            await _stop(server)

    def _relay(self, loop: asyncio.AbstractEventLoop, wake: asyncio.Event,
               done: threading.Event) -> None:
        """The inbox's signal (set by `offer`, and on stop), passed on to the loop."""
        signal = self.inbox.signal
        while True:
            signal.wait()
            signal.clear()  # before the loop looks: a verdict put after this signals again
            if done.is_set():
                return
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
                loop.call_soon_threadsafe(wake.set)

    async def _wait(self) -> None:
        assert self._wake is not None
        timeout = max(0.0, self._next_state_mono - time.monotonic())
        due = self.handshake.next_due_ms()
        if due is not None:
            timeout = min(timeout, max(0.0, (due - self.clock.now_ms()) / 1000.0))
        if not self._wake.is_set() and timeout > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
        self._wake.clear()

    async def _process(self, nodes: Nodes) -> None:
        now = self.clock.now_ms()
        taken = self.inbox.take_all()
        for verdict, seq, offered in taken:
            result = result_from_verdict(verdict, seq, self.node, now, offered)
            await self._take(nodes, result)
        if taken:
            await nodes.write(c.RECENT_ITEM_IDS, self.store.item_ids(), ua.VariantType.String)
        await self._apply(nodes, self.handshake.step(self.clock.now_ms()))
        if time.monotonic() >= self._next_state_mono:
            self._next_state_mono = time.monotonic() + STATE_INTERVAL_S
            await self._refresh_state(nodes)

    async def _finish(self, nodes: Nodes) -> None:
        """Stopping: the verdicts given out while the node stopped (shutdown fail-safes) are
        taken in, and the block goes on with its handshake while `stop_by` allows and a
        client is there to acknowledge."""
        await self._process(nodes)
        while ((self.handshake.waiting or self.handshake.queued)
               and time.monotonic() < self.stop_by and self._connections() > 0):
            await self._wait_briefly()
            await self._process(nodes)
        self.stats.unshown_at_stop += len(self.handshake.drain())
        self._flush_missed(force=True)

    async def _wait_briefly(self) -> None:
        assert self._wake is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), 0.05)
        self._wake.clear()

    # --- results ------------------------------------------------------------------------

    async def _take(self, nodes: Nodes, result: Result) -> None:
        """A new result: kept by item ID, the latest, an event; then queued for the block
        (a late one only without the handshake: its item has passed the divert)."""
        self.stats.results += 1
        self.store.add(result)
        values = result.values()
        await nodes.write_fields(c.latest_node, c.RESULT_FIELDS, values)
        for generator in nodes.events:
            for f in c.RESULT_FIELDS:
                setattr(generator.event, f.name, values[f.name])
            await generator.trigger(message=f"{result.item_id}: "
                                    f"{c.DECISION_NAMES[result.decision].lower()}")
        if not result.late or not self.handshake.required:
            self.handshake.push(result)

    async def _apply(self, nodes: Nodes, step: Step) -> None:
        for missed in step.missed:
            self.stats.missed[missed.why] += 1
        if step.missed:
            self._missed_unreported += step.missed
            await nodes.write(c.plc_node("Missed"), self.handshake.missed & 0xFFFF_FFFF,
                              ua.VariantType.UInt32)
        if step.withdrawn is not None and not step.shown and self._shown_valid:
            await self._set_valid(nodes, False)
        for result in step.shown:
            if self._shown_valid and self.handshake.required:
                await self._set_valid(nodes, False)
            # The data first, then Seq, then ResultValid: a client that reads the block on
            # the change of either sees a complete result.
            values = result.values()
            await nodes.write_fields(c.plc_node, _PLC_DATA_FIELDS, values)
            await nodes.write(c.plc_node("Seq"), result.seq32, ua.VariantType.UInt32)
            await self._set_valid(nodes, True)
        self._flush_missed()

    async def _set_valid(self, nodes: Nodes, valid: bool) -> None:
        self._shown_valid = valid
        await nodes.write(c.plc_node("ResultValid"), valid, ua.VariantType.Boolean)

    def _on_ack(self, wv: ua.WriteValue) -> ua.StatusCode:
        """A client wrote ResultAck (on the loop, inside the Write service)."""
        value = check_ack_value(wv)
        if isinstance(value, ua.StatusCode):
            return value
        outcome = self.handshake.ack(value, self.clock.now_ms())
        if outcome is Ack.WRONG:
            return status(ua.StatusCodes.BadOutOfRange)
        if outcome is Ack.LATE:
            self.stats.late_acks += 1
        else:
            self.stats.acked += 1
            if self._wake is not None:
                self._wake.set()  # the next result may be shown now
        return status(ua.StatusCodes.Good)

    async def _get_result(self, _parent: ua.NodeId, *args: ua.Variant) -> ua.CallMethodResult:
        """GetResultByItemId(ItemId: String)."""
        if len(args) != 1:
            return method_result(ua.StatusCodes.BadArgumentsMissing if not args
                                 else ua.StatusCodes.BadTooManyArguments)
        arg = args[0]
        if (not isinstance(arg, ua.Variant) or arg.VariantType != ua.VariantType.String
                or not isinstance(arg.Value, str)):
            bad = status(ua.StatusCodes.BadTypeMismatch)
            return method_result(ua.StatusCodes.BadInvalidArgument, inputs=[bad])
        result = self.store.get(arg.Value)
        return method_result(ua.StatusCodes.Good,
                             result_outputs(result.values() if result is not None else None),
                             inputs=[status(ua.StatusCodes.Good)])

    # --- reporting ----------------------------------------------------------------------

    def _flush_missed(self, force: bool = False) -> None:
        """At most one `…/events` message (and log line) a second about missed results."""
        missed = self._missed_unreported
        if not missed or (not force and time.monotonic() - self._missed_reported_mono
                          < MISSED_EVENT_INTERVAL_S):
            return
        self._missed_unreported = []
        self._missed_reported_mono = time.monotonic()
        last = missed[-1]
        detail = {"count": len(missed), "item_id": last.result.item_id, "seq": last.result.seq,
                  "why": last.why, "deadline": last.result.deadline_ms,
                  "missed_total": self.handshake.missed, "clients": self.stats.clients}
        log.warning("opcua_results_missed", **detail)
        publish = self._publish_event()
        if publish is not None:
            try:
                publish("opcua_result_missed", detail)
            except Exception:  # the event is lost; the metrics still count the misses
                log.exception("opcua_event_failed")

    def _connections(self) -> int:
        bserver = self._server.bserver if self._server is not None else None
        return len(bserver.clients) if bserver is not None else 0

    async def _refresh_state(self, nodes: Nodes) -> None:
        self.stats.clients = self._connections()
        source = self._state()
        if source is None:
            return
        try:
            state = source()
        except Exception:  # the node's health could not be read: say so, keep serving
            log.exception("opcua_state_failed")
            state = VisionState(error="node state unavailable")
        key = (state.current, state.error, tuple(sorted(state.model_versions.items())),
               tuple(sorted(state.calibration_ok.items())))
        if key == self._last_state:
            return
        self._last_state = key
        await self._write_state(nodes, state)

    async def _write_state(self, nodes: Nodes, state: VisionState) -> None:
        await nodes.write(c.CURRENT_STATE, ua.LocalizedText(state.current),
                          ua.VariantType.LocalizedText)
        await nodes.write(c.ERROR_TEXT, state.error, ua.VariantType.String)
        await nodes.write(c.MODEL_VERSIONS,
                          [f"{k}={v}" for k, v in sorted(state.model_versions.items())],
                          ua.VariantType.String)
        await nodes.write(c.CALIBRATION_OK, all(state.calibration_ok.values()),
                          ua.VariantType.Boolean)
        await nodes.write(c.CALIBRATION_STATUS,
                          [f"{k}={'ok' if v else 'failed'}" for k, v in
                           sorted(state.calibration_ok.items())], ua.VariantType.String)


async def _stop(server: Server) -> None:
    """`server.stop()`, without waiting up to a second for the clock task's next tick."""
    task = server.iserver.time_task
    if task is not None:
        task.cancel()
        server.iserver.time_task = None
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await server.stop()
