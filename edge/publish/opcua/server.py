"""The OPC UA server on its own thread and asyncio loop, fed by `OpcUaChannel.offer`.

Nothing here runs on the node's threads: `offer` only appends to the bounded `Inbox` and
sets an event the loop is woken by. Whatever a client does (stalls, floods, never reads its
socket), it costs this loop's time, never the scheduler's; a verdict the loop cannot take in
time is dropped from the inbox and counted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from asyncua import Server, ua
from asyncua.common.connection import TransportLimits
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.address_space import AddressSpace, AttributeService

from edge.config import NodeConfig, OpcUaConfig
from edge.publish.opcua import contract as c
from edge.publish.opcua.address_space import Nodes, status
from edge.publish.opcua.certs import application_uri
from edge.publish.opcua.security import (
    POLICIES,
    Users,
    VerdictUsers,
    guard_session_rebinding,
    identity_tokens,
)
from edge.publish.opcua.trust import TrustFolder
from edge.types import Verdict

log = structlog.get_logger(__name__)

EventSink = Callable[[str, Mapping[str, object]], None]
#: Shortest publishing interval a subscription gets: a client asking for less (or for 0,
#: "as fast as possible") would have the loop spin for it.
MIN_PUBLISHING_INTERVAL_MS = 10.0
#: `…/events` about results the PLC missed: at most one per this many seconds, with a count.
MISSED_EVENT_INTERVAL_S = 1.0
#: The vision system's state is refreshed this often.
STATE_INTERVAL_S = 1.0
#: New connections accepted at once beyond `opcua.connects_per_s`.
CONNECT_BURST = 20.0


@dataclass(slots=True)
class Stats:
    """Counters: written by the server's loop (and `offer`, for `dropped`), read anywhere."""

    up: bool = False
    clients: int = 0
    results: int = 0
    dropped: int = 0
    acked: int = 0
    late_acks: int = 0
    missed: dict[str, int] = field(default_factory=lambda: {"deadline": 0, "ack_timeout": 0})
    writes_refused: int = 0
    logins_refused: int = 0
    connections_refused: int = 0
    errors: int = 0
    certificates_refused: int = 0
    unshown_at_stop: int = 0


class Inbox:
    """Verdicts on their way to the loop: bounded, never blocking the thread that offers.

    `put` only sets `signal` (a threading.Event; `loop.ServerLoop` relays it to the loop
    from a thread of its own): waking the loop straight from here would write to its socket,
    a system call that lets go of the GIL, which the server's thread would then hold for up
    to the switch interval (5 ms) before the scheduler's thread got it back.
    """

    def __init__(self, size: int, stats: Stats) -> None:
        self._size = size
        self._stats = stats
        self._items: deque[tuple[Verdict, int, float]] = deque()
        self._lock = threading.Lock()
        self.signal = threading.Event()

    def put(self, verdict: Verdict, seq: int) -> bool:
        with self._lock:
            if len(self._items) >= self._size:
                self._stats.dropped += 1
                return False
            self._items.append((verdict, seq, time.monotonic()))
        self.signal.set()
        return True

    def take_all(self) -> list[tuple[Verdict, int, float]]:
        with self._lock:
            items = list(self._items)
            self._items.clear()
        return items

    def __len__(self) -> int:
        return len(self._items)


class _AckGuard(AttributeService):
    """Client writes to ResultAck are checked here, with a status code per refused write (a
    value of the wrong type or shape, a bad status, an index range, a Seq not shown), and
    the node keeps its value; every other node is left to the access levels (read-only)."""

    def __init__(self, aspace: AddressSpace, ack: ua.NodeId,
                 on_ack: Callable[[ua.WriteValue], ua.StatusCode], stats: Stats) -> None:
        super().__init__(aspace)
        self._ack = ack
        self._on_ack = on_ack
        self._stats = stats

    async def write(self, params: ua.WriteParameters,
                    user: User | None = None) -> list[ua.StatusCode]:
        if user is None or user.role is UserRole.Admin:  # the server's own writes
            return await super().write(params, User(role=UserRole.Admin))
        results: list[ua.StatusCode] = []
        for wv in params.NodesToWrite:
            if wv.NodeId == self._ack and wv.AttributeId == ua.AttributeIds.Value:
                status = self._on_ack(wv)
                if not status.is_good():
                    self._stats.writes_refused += 1
                    results.append(status)
                    continue
            one = await super().write(ua.WriteParameters(NodesToWrite=[wv]), user)
            self._stats.writes_refused += sum(1 for s in one if not s.is_good())
            results += one
        return results


def check_ack_value(wv: ua.WriteValue) -> int | ua.StatusCode:
    """The Seq a ResultAck write carries, or why it is refused."""
    if wv.IndexRange:
        return status(ua.StatusCodes.BadIndexRangeInvalid)
    dv = wv.Value
    if dv is None or dv.Value is None:
        return status(ua.StatusCodes.BadTypeMismatch)
    if dv.StatusCode is not None and not dv.StatusCode.is_good():
        return status(ua.StatusCodes.BadWriteNotSupported)
    variant = dv.Value
    if (variant.VariantType != ua.VariantType.UInt32 or variant.is_array
            or not isinstance(variant.Value, int)):
        return status(ua.StatusCodes.BadTypeMismatch)
    return variant.Value


async def make_server(cfg: OpcUaConfig, node: NodeConfig, users: Users, stats: Stats) -> Server:
    """An asyncua server with the configured endpoints, users and trusted certificates (its
    address space still to be added)."""
    trust = None
    if cfg.trusted_dir is not None:
        trust = TrustFolder(Path(cfg.trusted_dir), Path(cfg.trusted_dir).parent / "rejected",
                            on_refused=lambda _why: _count_certificate(stats))
    channel_refusal = _channel_check(cfg, trust)
    server = Server(user_manager=VerdictUsers(
        users, cfg.allow_anonymous, channel_refusal=channel_refusal,
        on_refused=lambda _why: _count_login(stats)))
    await server.init()
    guard_session_rebinding(server.iserver, channel_refusal)
    server.set_endpoint(f"opc.tcp://{_url_host(cfg.bind)}:{cfg.port}/")
    server.set_server_name(f"conveyor-vision {node.node_id}")
    server.product_uri = "urn:conveyor-vision"
    await server.set_application_uri(application_uri(node))
    server.set_security_policy([POLICIES[m] for m in cfg.security])
    server.set_identity_tokens(identity_tokens(users, cfg.allow_anonymous))
    if cfg.cert_file is not None and cfg.key_file is not None:
        await server.load_certificate(str(cfg.cert_file))
        await server.load_private_key(str(cfg.key_file))
    if trust is not None:
        server.set_certificate_validator(trust)
    _limit(server, cfg)
    return server


def _channel_check(cfg: OpcUaConfig, trust: TrustFolder | None
                   ) -> Callable[[bytes | None], str | None]:
    """Sessions on an unsecured channel only with the 'none' endpoint configured; on a
    secured one only with a trusted certificate."""
    unsecured_ok = "none" in cfg.security

    def refusal(peer_certificate: bytes | None) -> str | None:
        if trust is None:
            return None if peer_certificate or unsecured_ok else "unsecured_channel"
        return trust.channel_refusal(peer_certificate, unsecured_ok)

    return refusal


def _url_host(bind: str) -> str:
    return f"[{bind}]" if ":" in bind else bind


def _count_login(stats: Stats) -> None:
    stats.logins_refused += 1


def _count_certificate(stats: Stats) -> None:
    stats.certificates_refused += 1


def _limit(server: Server, cfg: OpcUaConfig) -> None:
    """Bounds on what clients may make the server hold (memory, and this loop's time)."""
    iserver = server.iserver
    iserver.max_connections = cfg.max_clients
    iserver.max_subscriptions = 4 * cfg.max_clients
    iserver.max_unacked_messages_per_subscription = 200
    iserver.max_monitored_item_queue_size = 100
    iserver.max_pending_activation_seconds = 10.0
    buffer, message = 65535, 4 * 1024 * 1024  # asyncua's default allows 100 MB messages
    server.limits = TransportLimits(max_recv_buffer=buffer, max_send_buffer=buffer,
                                    max_chunk_count=-(-message // buffer),
                                    max_message_size=message)
    service = iserver.subscription_service
    create = service.create_subscription

    async def create_clamped(params: ua.CreateSubscriptionParameters,
                             callback: Callable[..., object], session_id: ua.NodeId,
                             request_callback: Callable[..., object] | None = None,
                             ) -> ua.CreateSubscriptionResult:
        params.RequestedPublishingInterval = max(params.RequestedPublishingInterval,
                                                 MIN_PUBLISHING_INTERVAL_MS)
        return await create(params, callback, session_id, request_callback)

    service.create_subscription = create_clamped  # type: ignore[method-assign]


def quiet_asyncua_logs() -> None:
    """asyncua logs through the standard library, which the node leaves unconfigured: only
    its errors reach stderr. Clients' refused requests are logged at ERROR by its message
    processor (a client could flood the journal): those are counted in the metrics instead."""
    logging.getLogger("asyncua").setLevel(logging.ERROR)
    logging.getLogger("asyncua.server.uaprocessor").setLevel(logging.CRITICAL)
    # The trust store logs each untrusted certificate with a traceback, under its own name.
    logging.getLogger("asyncuagds.validate").setLevel(logging.CRITICAL)


def guard_ack_writes(server: Server, nodes: Nodes,
                     on_ack: Callable[[ua.WriteValue], ua.StatusCode], stats: Stats) -> None:
    """Route the sessions' writes through `_AckGuard` (they look the service up per call)."""
    iserver = server.iserver
    iserver.attribute_service = _AckGuard(iserver.aspace, nodes.nid(c.plc_node("ResultAck")),
                                          on_ack, stats)


class _ConnectionGate(list[Any]):
    """The binary server's list of connections, admitting at most `per_s` new ones a second
    (bursts of `burst`): a connection over budget is closed before its first message, as a
    secure session (RSA, then asyncua's message handling) costs the loop about 35 ms of CPU."""

    def __init__(self, per_s: float, burst: float, stats: Stats) -> None:
        super().__init__()
        self._per_s = per_s
        self._burst = burst
        self._tokens = burst
        self._last = time.monotonic()
        self._stats = stats

    def append(self, protocol: Any) -> None:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._per_s)
        self._last = now
        if self._tokens < 1.0:
            self._stats.connections_refused += 1
            protocol.transport.close()  # connection_lost follows; it was never listed
            return
        self._tokens -= 1.0
        super().append(protocol)


def gate_connections(server: Server, per_s: float, stats: Stats) -> None:
    """After `server.start()`: new connections go through `_ConnectionGate` (asyncua looks
    the list up each time it makes a connection's protocol)."""
    assert server.bserver is not None
    server.bserver.clients = _ConnectionGate(per_s, CONNECT_BURST, stats)
