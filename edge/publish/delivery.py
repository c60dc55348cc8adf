"""Outbox rows in and out of paho: the mid <-> seq map, PUBACKs, re-sends.

paho calls `on_publish` with its own message lock held, so the callback only
queues the PUBACK; the ``mqtt-acks`` thread marks the outbox row done (and only
then forgets the mid, so a top-up never re-sends an acknowledged row).
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

from edge.publish.metrics import AckedVerdict

if TYPE_CHECKING:
    from collections.abc import Callable

    from edge.clock import Clock
    from edge.publish.outbox import Outbox, OutboxRow

log = structlog.get_logger(__name__)

#: Messages paho may hold in memory; the outbox holds the rest and tops paho up.
MAX_QUEUED = 10_000


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
        self._acks: queue.Queue[tuple[int, bool, str, float]] = queue.Queue()
        self.counts: Counter[str] = Counter()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run_acks, name="mqtt-acks", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._acks.put((-1, False, "", 0.0))
        if self._thread is not None:
            self._thread.join(timeout_s)

    def forget_in_flight(self, replace_client: Callable[[], None]) -> None:
        """Replace the paho client (`replace_client`): nothing is held in memory any more.
        Under the lock that sends take, so that no verdict goes to the old client after its
        messages were forgotten (it would never be re-sent: it would look held)."""
        with self._lock:
            self._mid_seq.clear()
            self._seq_mid.clear()
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
        queue or a client rebuild); paho re-sends what it holds itself on reconnect."""
        with self._lock:
            held = set(self._seq_mid)
            if reconnected:
                # paho sends all it holds now, but a verdict that only waited there while we
                # were offline goes out for the first time: not a re-send.
                self.counts["resent"] += sum(map(self._went_out, held))
                self._sent |= held
        room = max(0, MAX_QUEUED - len(held))
        sent = sum(self.send(row) for row in self._outbox.pending(exclude=held, limit=room))
        if sent or (reconnected and held):
            log.info("mqtt.resending", from_outbox=sent, in_flight=len(held))

    def top_up(self) -> None:
        with self._lock:
            held = len(self._seq_mid)
        if self._outbox.unacked > held:
            self.resend_pending(reconnected=False)

    def on_publish(self, _client: paho.Client, _userdata: Any, mid: int, reason: Any,
                   _props: Any) -> None:
        # paho holds its message lock here: hand over, do nothing else.
        self._acks.put((mid, bool(reason.is_failure), str(reason), self._clock.now_ms()))

    def _run_acks(self) -> None:
        while True:
            mid, failed, reason, acked_ms = self._acks.get()
            if mid < 0:
                return
            with self._lock:
                seq = self._mid_seq.get(mid)
            if seq is None:
                continue  # a status or event message
            booked = True
            try:
                self._record(seq, failed, reason, acked_ms)
            except (sqlite3.Error, OSError) as exc:
                booked = False
                # A disk too full even for the update: the row stays unacknowledged and is
                # sent again (the controller deduplicates by seq). This thread must not die:
                # no PUBACK would be booked after it, and the outbox would only grow.
                with self._lock:
                    self.counts["acks_not_recorded"] += 1
                log.error("mqtt.ack_not_recorded", seq=seq, error=f"{type(exc).__name__}: {exc}")
            with self._lock:  # only now: a top-up must not re-send an acknowledged row
                self._mid_seq.pop(mid, None)
                self._seq_mid.pop(seq, None)
                if booked:  # else it went out once: the top-up that sends it re-sends it
                    self._sent.discard(seq)

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
