"""Outbox rows in and out of paho: the mid <-> seq map, PUBACKs, re-sends.

paho calls `on_publish` with its own message lock held, so the callback only
queues the PUBACK; the ``mqtt-acks`` thread marks the outbox row done (and only
then forgets the mid, so a top-up never re-sends an acknowledged row). A PUBACK
the outbox cannot book (disk full) is kept in memory and booked at a later top-up:
the broker has the verdict, so it is not sent again.
"""

from __future__ import annotations

import math
import queue
import sqlite3
import threading
from collections import Counter
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.publish.counters import AckedVerdict
from edge.workers import WorkerThread

if TYPE_CHECKING:
    from collections.abc import Callable, Collection

    from edge.clock import Clock
    from edge.publish.outbox import Outbox, OutboxRow

log = structlog.get_logger(__name__)

#: Messages paho may hold in memory; the outbox holds the rest and tops paho up.
MAX_QUEUED = 10_000
# `_acks` entries with these mids are orders to the booking thread, not PUBACKs.
_STOP, _RETRY = -1, -2


def properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]  # paho leaves it untyped


class Delivery:
    """Hands outbox rows to the current paho client and books their PUBACKs."""

    def __init__(self, outbox: Outbox, clock: Clock, client: Callable[[], paho.Client],
                 v5: Callable[[], bool], on_acked: Callable[[AckedVerdict], None] | None
                 ) -> None:
        self._outbox = outbox
        self._clock = clock
        self._client = client
        self._v5 = v5
        self._on_acked = on_acked
        self._lock = threading.Lock()
        self._mid_seq: dict[int, int] = {}
        self._seq_mid: dict[int, int] = {}
        # Seqs that already went out on a connection (until their PUBACK): sending one of those
        # again is a re-send. Rows below `_first_seq` were written by an earlier run, which may
        # have sent them: the outbox does not record that, so they count as re-sent too.
        self._sent: set[int] = set()
        self._first_seq = outbox.stats().next_seq
        # (mid, failed, reason, acked ms, client generation): a PUBACK of a client replaced
        # since (a failover, a protocol fallback) names a mid the new client reuses.
        self._acks: queue.Queue[tuple[int, bool, str, float, int]] = queue.Queue()
        self._generation = 0
        # PUBACKs the outbox could not book yet: seq -> (failed, reason, acked_ms). One per
        # verdict sent, at most: bounded by the outbox's rows plus what paho holds.
        self._unbooked: dict[int, tuple[bool, str, float]] = {}
        self._retry_queued = False
        outbox.on_dropped = self._forget
        self.counts: Counter[str] = Counter()
        # Woken by a sentinel on its queue: it books what is queued before it stops.
        self._worker = WorkerThread("mqtt-acks", self._run_acks,
                                    wake=lambda: self._acks.put((_STOP, False, "", 0.0, -1)))

    def start(self) -> None:
        self._worker.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._worker.stop(timeout_s)

    def forget_in_flight(self, replace_client: Callable[[], None]) -> None:
        """Replace the paho client (`replace_client`): nothing is held in memory any more.
        Under the lock that sends take, so that no verdict goes to the old client after its
        messages were forgotten (it would never be re-sent: it would look held)."""
        with self._lock:
            self._mid_seq.clear()
            self._seq_mid.clear()
            self._generation += 1  # the old client's PUBACKs still queued: ignored
            replace_client()

    def send(self, row: OutboxRow) -> bool:
        """Hand a row to paho unless paho already holds it."""
        props = None
        if self._v5():
            props = properties(PacketTypes.PUBLISH)
            left_ms = row.deadline_ms - self._clock.now_ms()
            if left_ms > 0:  # after the deadline: audit only, no expiry
                props.MessageExpiryInterval = max(1, math.ceil(left_ms / 1000.0))
        with self._lock:
            if row.seq in self._seq_mid:
                return False
            info = self._client().publish(row.topic, row.payload, qos=1, retain=False,
                                          properties=props)
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                log.warning("mqtt.publish_deferred", seq=row.seq, rc=paho.error_string(info.rc))
                return False  # stays in the outbox; the next top-up sends it
            self._mid_seq[info.mid] = row.seq
            self._seq_mid[row.seq] = info.mid
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:  # out now; else at the next connect
                if self._went_out(row.seq):
                    self.counts["resent"] += 1
                self._sent.add(row.seq)
        return True

    def _went_out(self, seq: int) -> bool:
        return seq in self._sent or seq < self._first_seq

    def resend_pending(self, *, reconnected: bool) -> None:
        """Hand paho every unacknowledged row it does not hold (after a restart, a full
        queue or a client rebuild); paho re-sends what it holds itself on reconnect. Rows
        whose PUBACK waits to be booked reached the broker: they are not sent again."""
        with self._lock:
            held = set(self._seq_mid)
            waiting = set(self._unbooked)
            if reconnected:
                # paho sends all it holds now, but a verdict that only waited there while we
                # were offline goes out for the first time: not a re-send.
                self.counts["resent"] += sum(map(self._went_out, held))
                self._sent |= held
        room = max(0, MAX_QUEUED - len(held))
        rows = self._outbox.pending(exclude=held | waiting, limit=room)
        sent = sum(self.send(row) for row in rows)
        if sent or (reconnected and held):
            log.info("mqtt.resending", from_outbox=sent, in_flight=len(held))

    def top_up(self) -> None:
        """Every TOP_UP_INTERVAL_S: book PUBACKs the disk refused, re-send what paho lost."""
        with self._lock:
            accounted = len(self._seq_mid) + len(self._unbooked)
            retry = bool(self._unbooked) and not self._retry_queued
            self._retry_queued |= retry
        if retry:  # on the booking thread: this one runs the network loop
            self._acks.put((_RETRY, False, "", 0.0, -1))
        if self._outbox.unacked > accounted:
            self.resend_pending(reconnected=False)

    def _forget(self, seqs: Collection[int]) -> None:
        """Rows the outbox dropped (counted in dropped_*): none will be sent or booked again,
        so their seqs would only pile up in `_sent`. Seqs paho holds leave at their PUBACK."""
        with self._lock:
            self._sent.difference_update(s for s in seqs if s not in self._seq_mid)

    def on_publish(self, _client: paho.Client, _userdata: Any, mid: int, reason: Any,
                   _props: Any) -> None:
        # paho holds its message lock here: hand over, do nothing else.
        self._acks.put((mid, bool(reason.is_failure), str(reason), self._clock.now_ms(),
                        self._generation))

    def _run_acks(self, _stop: threading.Event) -> None:
        while True:
            mid, failed, reason, acked_ms, generation = self._acks.get()
            if mid == _STOP:
                self._book_unbooked()  # a last chance: else they are sent again after restart
                return
            if mid == _RETRY:
                self._book_unbooked()
                continue
            with self._lock:
                # A replaced client's PUBACK: its verdict is sent again (same seq) instead.
                seq = self._mid_seq.get(mid) if generation == self._generation else None
            if seq is None:
                continue  # a status or event message, or a replaced client's PUBACK
            try:
                self._record(seq, failed, reason, acked_ms)
            except (sqlite3.Error, OSError) as exc:
                # A disk too full even for the update. The broker has the verdict: keep its
                # PUBACK and book it at a later top-up instead of sending it again. This
                # thread must not die: no PUBACK would be booked after it.
                log.error("mqtt.ack_not_recorded", seq=seq, error=f"{type(exc).__name__}: {exc}")
                with self._lock:
                    self.counts["acks_not_recorded"] += 1
                    self._unbooked[seq] = (failed, reason, acked_ms)
                    self._mid_seq.pop(mid, None)
                    self._seq_mid.pop(seq, None)
                continue
            with self._lock:  # only now: a top-up must not re-send an acknowledged row
                self._mid_seq.pop(mid, None)
                self._seq_mid.pop(seq, None)
                self._sent.discard(seq)

    def _book_unbooked(self) -> None:
        """Book the PUBACKs the outbox refused before, oldest first; stop at the first that
        still fails (the disk is still full: try again at the next top-up)."""
        with self._lock:
            self._retry_queued = False
            waiting = sorted(self._unbooked.items())
        for seq, (failed, reason, acked_ms) in waiting:
            try:
                self._record(seq, failed, reason, acked_ms)
            except (sqlite3.Error, OSError) as exc:  # logged once, at its first failure
                log.debug("mqtt.ack_still_not_recorded", seq=seq, error=str(exc))
                return
            with self._lock:
                del self._unbooked[seq]
                self._sent.discard(seq)
            log.info("mqtt.ack_recorded_late", seq=seq)

    def _record(self, seq: int, failed: bool, reason: str, acked_ms: float) -> None:
        row = self._outbox.mark_acked(seq, acked_ms, f"refused: {reason}" if failed else "acked")
        if failed:
            log.error("mqtt.verdict_refused", seq=seq, reason=reason)
        if row is None:
            # Counted already: acknowledged before, or dropped from the full outbox before
            # its PUBACK came (in dropped_expired or dropped_actionable).
            log.info("mqtt.puback_already_counted", seq=seq, refused=failed)
            return
        with self._lock:
            self.counts["refused" if failed else "acked"] += 1
        if not failed and self._on_acked is not None:
            try:
                self._on_acked(AckedVerdict(seq, row.item_id, row.captured_ms, row.decided_ms,
                                            row.published_ms, acked_ms))
            except Exception:
                log.exception("mqtt.on_acked_failed", seq=seq)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)
