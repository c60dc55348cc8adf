"""Where items go between the stages and the deadline scheduler.

`Admission` takes the controller's announcements to the scheduler (which owns each item's
divert deadline) and to the induct associator (which ties the physical item to it).
`Completion` takes each decided item from the inference stage to everything that needs it:
latency metrics, the recent views kept for feedback, the audit snapshots, the observers, the
scheduler, which publishes the verdict, and then, for items the models judged, the shadow
scorer; what judged the item (`edge.audit.replay.ModelContext`) is read as it is decided and
travels with it to the snapshots and the shadow scorer. `Broadcast` is what the scheduler
publishes through: the MQTT publisher (whose outbox numbers each verdict), then every other
channel to the controller side (OPC UA, Sparkplug B), which must never hold the verdict up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import structlog

from edge.audit.store import SnapshotStore
from edge.perception.induct import InductAssociator
from edge.pipeline.feedback import RecentViews
from edge.pipeline.stages import Decided
from edge.types import Announcement, ItemRecord, Verdict
from edge.verdicts.deadlines import DeadlineScheduler, VerdictSink

log = structlog.get_logger(__name__)

#: What judged an item (the snapshot's ``replay`` block), read as it is decided; never raises.
ModelContextFn = Callable[[ItemRecord], Mapping[str, Any]]
#: The shadow scorer's `offer`: the item, production's verdict as it went out, its context.
ShadowOffer = Callable[[ItemRecord, Verdict, Mapping[str, Any] | None], None]


class VerdictChannel(Protocol):
    """Another way verdicts reach the controller side, beside MQTT (OPC UA, Sparkplug B).

    `offer` is called on the scheduler's hot path for every verdict (fail-safe, late and
    shutdown ones included) with the outbox's `seq`: it must return at once (a bounded queue,
    drops counted), never block on a client. Started after, and stopped after, the MQTT
    publisher, so that verdicts given out while stopping reach it too.
    """

    def offer(self, verdict: Verdict, seq: int) -> None: ...

    def start(self) -> None: ...

    def stop(self, timeout_s: float = 5.0) -> None: ...


class Broadcast:
    """The scheduler's sink: MQTT first (durable, numbered), then every other channel."""

    def __init__(self, primary: VerdictSink, channels: Sequence[VerdictChannel]) -> None:
        self._primary = primary
        self.channels = tuple(channels)

    def publish_verdict(self, verdict: Verdict) -> int:
        seq = self._primary.publish_verdict(verdict)
        for channel in self.channels:
            try:
                channel.offer(verdict, seq)
            except Exception:  # a broken channel costs its own copy, never the MQTT verdict
                log.exception("verdict_channel_failed", channel=type(channel).__name__,
                              item_id=verdict.item_id)
        return seq


class Admission:
    """Announcements in: an item the scheduler admits is then looked for on the belt."""

    def __init__(self, scheduler: DeadlineScheduler, associator: InductAssociator) -> None:
        self._scheduler = scheduler
        self._associator = associator

    def __call__(self, announcement: Announcement) -> None:
        # The associator's belt speed and the item's position at induct, as for tracking.
        deadline = self._associator.divert_deadline_ms(announcement)
        if self._scheduler.announce(announcement, deadline):
            self._associator.announce(announcement)


class Completion:
    """A decided item out: observed, remembered, snapshotted, handed to the scheduler, then
    (judged by the models) to the shadow scorer, which must not wait. Called on the inference
    thread under the batch lock: `context` reads the models of the item's own batch."""

    def __init__(self, scheduler: DeadlineScheduler, recent: RecentViews,
                 snapshots: SnapshotStore | None, observe_latency_s: Callable[[float], None],
                 on_decided: Callable[[Decided], None] | None = None,
                 shadow: ShadowOffer | None = None,
                 context: ModelContextFn | None = None) -> None:
        self._scheduler = scheduler
        self._recent = recent
        self._snapshots = snapshots
        self._observe_latency_s = observe_latency_s
        self._on_decided = on_decided
        self._shadow = shadow
        self._context = context

    def __call__(self, decided: Decided) -> None:
        verdict = decided.verdict
        if verdict.captured_ms is not None:
            self._observe_latency_s(max(0.0, verdict.decided_ms - verdict.captured_ms) / 1000.0)
        self._recent.remember(decided.record, verdict)
        context = None if self._context is None else self._context(decided.record)
        if self._snapshots is not None:  # assigns the ID; files are written off this thread
            verdict = self._snapshots.offer(decided.record, verdict, context)
            decided = Decided(decided.record, verdict)
        if self._on_decided is not None:
            self._on_decided(decided)
        self._scheduler.complete(verdict)
        if self._shadow is not None and verdict.scores is not None:  # after: never in its way
            self._shadow(decided.record, verdict, context)
