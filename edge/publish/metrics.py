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
    acked: int
    resent: int  # re-sends after a reconnect or a restart
    refused: int  # PUBACK with an error reason code (e.g. not authorized)
    reconnects: int
    connect_failures: int
    events_published: int
    outbox_depth: int
    dropped_expired: int
    dropped_actionable: int
    outbox_unpersisted: int  # verdicts sent although the outbox could not store them
    inputs_received: int
    accepted: Mapping[str, int] = field(default_factory=dict)
    rejected: Mapping[str, int] = field(default_factory=dict)
    last_error: str | None = None
