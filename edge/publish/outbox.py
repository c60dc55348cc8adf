"""The durable verdict outbox: SQLite in WAL mode, written before anything is published.

Life of a row: `append` allocates the next per-node sequence number, renders the
payload with it and commits (``synchronous=FULL``: the row survives a power cut)
*before* the publisher hands the bytes to MQTT. `mark_acked` records the
broker's PUBACK. Rows without an ack are `pending`: the publisher re-sends them,
with the same seq and identical bytes, after a reconnect and after a restart.
The next sequence number is stored in its own table, so pruning never reuses one.

A verdict the database cannot take (disk full, I/O error) is still returned as a row,
with the next sequence number, and goes out over MQTT as usual; it is only not durable
(`unpersisted`, `write_failing`): losing the audit copy beats losing the verdict.

Size bound (``storage.outbox_max_rows``), applied before every append:

1. acknowledged rows are deleted, oldest first, down to 90 % of the bound
   (they are only a local audit trail);
2. if the outbox is still full it holds only unacknowledged rows: the oldest of
   those whose divert deadline has passed (they can no longer steer anything)
   are deleted and counted in `dropped_expired`;
3. if it is *still* full, every row is unacknowledged and actionable (the broker
   has been unreachable for a long time at a high rate): the oldest are deleted
   and counted in `dropped_actionable`. The bound always holds.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from collections.abc import Callable, Collection
    from pathlib import Path

log = structlog.get_logger(__name__)

#: Verdicts the database could not take, kept in memory until their PUBACK. One whose
#: message paho dropped (client rebuilt, queue full) never gets one and stays until
#: evicted, so keep this small: as many as paho may hold (delivery.MAX_QUEUED), a few MB.
MAX_UNSTORED = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    item_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    deadline_ms REAL NOT NULL,
    captured_ms REAL,
    decided_ms REAL NOT NULL,
    published_ms REAL NOT NULL,
    acked_ms REAL,
    outcome TEXT
);
CREATE INDEX IF NOT EXISTS outbox_unacked ON outbox(seq) WHERE acked_ms IS NULL;
CREATE INDEX IF NOT EXISTS outbox_item ON outbox(item_id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
_COLUMNS = "seq, item_id, topic, payload, deadline_ms, captured_ms, decided_ms, published_ms"


@dataclass(frozen=True, slots=True)
class OutboxRow:
    seq: int
    item_id: str
    topic: str
    payload: bytes
    deadline_ms: float
    captured_ms: float | None
    decided_ms: float
    published_ms: float


@dataclass(frozen=True, slots=True)
class OutboxStats:
    rows: int
    unacked: int
    next_seq: int
    dropped_expired: int
    dropped_actionable: int


class Outbox:
    """A bounded, durable, thread-safe store of verdict payloads keyed by seq."""

    def __init__(self, path: Path, max_rows: int = 100_000) -> None:
        if max_rows < 10:
            raise ValueError(f"outbox max_rows {max_rows}: need at least 10")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_rows = max_rows
        self.dropped_expired = 0
        self.dropped_actionable = 0
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._rows = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        self._unacked = int(self._db.execute(
            "SELECT COUNT(*) FROM outbox WHERE acked_ms IS NULL").fetchone()[0])
        self._last_seq = 0
        self._last_seq = self._next_seq_locked() - 1  # the highest seq ever handed out
        self.unpersisted = 0  # rows handed out that the database could not take
        # Those rows until their PUBACK: it must not be mistaken for one for a dropped row.
        self._unstored: dict[int, OutboxRow] = {}
        self.write_failing = False  # the last append could not be stored
        # Told (without the lock) the seqs of unacknowledged rows it dropped: the size bound,
        # or unstored rows evicted. They will not be pending again.
        self.on_dropped: Callable[[list[int]], None] | None = None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def append(self, *, item_id: str, topic: str, deadline_ms: float, captured_ms: float | None,
               decided_ms: float, published_ms: float, now_ms: float,
               render: Callable[[int], bytes]) -> OutboxRow:
        """Allocate the next seq, store `render(seq)` durably and return the row."""
        failure: str | None = None  # why the database could not take the row
        dropped: list[int] = []
        with self._lock:
            try:
                self._enforce_bound(now_ms, dropped)
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                seq, failure = self._last_seq + 1, str(exc)
            else:
                try:
                    seq = self._next_seq_locked()
                    payload = render(seq)
                    self._db.execute(
                        f"INSERT INTO outbox ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (seq, item_id, topic, payload, deadline_ms, captured_ms, decided_ms,
                         published_ms))
                    self._db.execute(
                        "INSERT OR REPLACE INTO meta (key, value) VALUES ('next_seq', ?)",
                        (seq + 1,))
                    self._db.execute("COMMIT")
                except sqlite3.Error as exc:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                    seq, failure = self._last_seq + 1, str(exc)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            self._last_seq = seq
            self.write_failing = failure is not None
            if failure is None:
                self._rows += 1
                self._unacked += 1
            else:
                payload = render(seq)
                self.unpersisted += 1
                log.error("outbox.write_failed", seq=seq, item_id=item_id, error=failure,
                          unpersisted=self.unpersisted)
            row = OutboxRow(seq, item_id, topic, payload, deadline_ms, captured_ms, decided_ms,
                            published_ms)
            if failure is not None:
                if len(self._unstored) >= min(self.max_rows, MAX_UNSTORED):
                    oldest = next(iter(self._unstored))  # never acknowledged: forget it
                    del self._unstored[oldest]
                    dropped.append(oldest)
                self._unstored[seq] = row
        if dropped and self.on_dropped is not None:
            self.on_dropped(dropped)
        return row

    def _next_seq_locked(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
        stored = int(row[0]) if row else 1
        top = self._db.execute("SELECT MAX(seq) FROM outbox").fetchone()[0]
        # Rows the database could not take used up seqs as well.
        return max(stored, int(top) + 1 if top is not None else 1, self._last_seq + 1)

    def mark_acked(self, seq: int, acked_ms: float, outcome: str = "acked") -> OutboxRow | None:
        """Record the PUBACK (or a broker refusal); the row (stored or not), or None if already
        done: acknowledged before, or dropped by the size bound before its PUBACK came."""
        with self._lock:
            unstored = self._unstored.pop(seq, None)
            if unstored is not None:  # not in the database: nothing to write on a full disk
                return unstored
            cur = self._db.execute(
                "UPDATE outbox SET acked_ms = ?, outcome = ? WHERE seq = ? AND acked_ms IS NULL",
                (acked_ms, outcome, seq))
            if cur.rowcount == 0:
                return None
            self._unacked -= 1
            found = self._db.execute(f"SELECT {_COLUMNS} FROM outbox WHERE seq = ?",
                                     (seq,)).fetchone()
        return _row(found) if found else None

    def pending(self, exclude: Collection[int] = (), limit: int = 10_000) -> list[OutboxRow]:
        """Unacknowledged rows in seq order, without the seqs in `exclude`."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM outbox WHERE acked_ms IS NULL ORDER BY seq LIMIT ?",
                (limit + len(exclude),)).fetchall()
        return [r for r in map(_row, rows) if r.seq not in exclude][:limit]

    def has_item(self, item_id: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM outbox WHERE item_id = ? LIMIT 1",
                                    (item_id,)).fetchone() is not None

    @property
    def unacked(self) -> int:
        with self._lock:
            return self._unacked

    def stats(self) -> OutboxStats:
        with self._lock:
            return OutboxStats(self._rows, self._unacked, self._next_seq_locked(),
                               self.dropped_expired, self.dropped_actionable)

    def _enforce_bound(self, now_ms: float, dropped: list[int]) -> None:
        """Apply the size bound; the seqs of unacknowledged rows deleted go to `dropped`."""
        if self._rows < self.max_rows:
            return
        target = max(self.max_rows * 9 // 10, 1)
        self._delete("acked_ms IS NOT NULL", self._rows - target)
        if self._rows >= self.max_rows:
            seqs = self._delete(f"acked_ms IS NULL AND deadline_ms < {float(now_ms)!r}",
                                self._rows - self.max_rows + 1, unacked=True)
            dropped += seqs
            self.dropped_expired += len(seqs)
            if seqs:
                log.warning("outbox.dropped_expired", rows=len(seqs), total=self.dropped_expired)
        if self._rows >= self.max_rows:
            seqs = self._delete("acked_ms IS NULL", self._rows - self.max_rows + 1, unacked=True)
            dropped += seqs
            self.dropped_actionable += len(seqs)
            log.error("outbox.dropped_actionable", rows=len(seqs), total=self.dropped_actionable)

    def _delete(self, where: str, count: int, *, unacked: bool = False) -> list[int]:
        if count <= 0:
            return []
        # Selected, then deleted by the same query, not `DELETE … RETURNING`: that needs
        # SQLite 3.35, and JetPack 5 (Ubuntu 20.04) has 3.31. One writer holds the lock.
        chosen = f"SELECT seq FROM outbox WHERE {where} ORDER BY seq LIMIT ?"
        seqs = [int(r[0]) for r in self._db.execute(chosen, (count,)).fetchall()]
        self._db.execute(f"DELETE FROM outbox WHERE seq IN ({chosen})", (count,))
        self._rows -= len(seqs)
        if unacked:
            self._unacked -= len(seqs)
        return seqs


def _row(r: Any) -> OutboxRow:
    seq, item_id, topic, payload, deadline, captured, decided, published = r
    return OutboxRow(int(seq), str(item_id), str(topic), bytes(payload), float(deadline),
                     None if captured is None else float(captured), float(decided),
                     float(published))
