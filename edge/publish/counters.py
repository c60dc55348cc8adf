"""What the publisher reports: acknowledged verdicts and a counters snapshot."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping


@dataclass(frozen=True, slots=True)
class AckedVerdict:
    """A verdict the broker acknowledged (for capture-to-PUBACK latency)."""

    seq: int
    item_id: str
    captured_ms: float | None
    decided_ms: float
    published_ms: float
    acked_ms: float


@dataclass(frozen=True, slots=True)
class PublisherMetrics:
    connected: bool
    protocol: str
    published: int  # verdicts written to the outbox and handed to MQTT
    acked: int  # PUBACKs, once per verdict; not for one already in dropped_* (see Outbox)
    #: verdicts sent again after a reconnect, a client rebuild or a restart; not those that
    #: only waited (offline) to go out the first time. Every unacknowledged row from an
    #: earlier run counts: the outbox does not record whether that run had sent it.
    resent: int
    refused: int  # PUBACK with an error reason code (e.g. not authorized); once per verdict
    reconnects: int
    connect_failures: int
    events_published: int
    outbox_depth: int
    dropped_expired: int
    dropped_actionable: int
    outbox_unpersisted: int  # verdicts sent although the outbox could not store them
    inputs_received: int
    acks_not_recorded: int = 0  # PUBACKs the outbox could not book (disk): sent again later
    failovers: int = 0  # moves to the next broker of a failover list
    accepted: Mapping[str, int] = field(default_factory=dict)
    rejected: Mapping[str, int] = field(default_factory=dict)
    last_error: str | None = None
