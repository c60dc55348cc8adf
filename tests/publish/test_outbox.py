"""The durable outbox: sequence numbers, pending rows across restarts, the size bound."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

import pytest

from edge.publish.outbox import MAX_UNSTORED, Outbox

if TYPE_CHECKING:
    from pathlib import Path


def _append(box: Outbox, item: str, *, deadline_ms: float = 10_000.0,
            now_ms: float = 0.0) -> int:
    return box.append(item_id=item, topic="t/verdict", deadline_ms=deadline_ms,
                      captured_ms=None, decided_ms=now_ms, published_ms=now_ms, now_ms=now_ms,
                      render=lambda seq: f'{{"seq":{seq},"item":"{item}"}}'.encode()).seq


def test_rows_are_durable_in_wal_mode_and_pending_until_acked(tmp_path: Path) -> None:
    """Rows are committed in WAL mode before append returns; unacknowledged rows come back,
    in seq order with identical bytes, after the store is reopened (a restart)."""
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    seqs = [_append(box, f"i{i}") for i in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    box.mark_acked(2, 50.0)
    box.mark_acked(4, 60.0)
    # A second connection (another process) sees the committed rows.
    with sqlite3.connect(path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert other.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 5
    del box  # abandoned, never closed: like a SIGKILL
    again = Outbox(path)
    pending = again.pending()
    assert [r.seq for r in pending] == [1, 3, 5]
    assert pending[0].payload == b'{"seq":1,"item":"i0"}'
    assert again.unacked == 3
    assert [r.seq for r in again.pending(exclude={3})] == [1, 5]


def test_sequence_numbers_survive_restart_and_pruning(tmp_path: Path) -> None:
    """The next seq is persisted: it continues after a reopen even when every row that held
    the highest seq was pruned, so a (node_id, seq) key is never reused."""
    path = tmp_path / "o.db"
    box = Outbox(path, max_rows=10)
    for i in range(25):
        seq = _append(box, f"i{i}")
        box.mark_acked(seq, 1.0)
    box.close()
    again = Outbox(path, max_rows=10)
    assert _append(again, "next") == 26
    assert again.stats().rows <= 10


def test_acked_mark_is_idempotent(tmp_path: Path) -> None:
    """A second PUBACK for the same seq changes nothing and returns None."""
    box = Outbox(tmp_path / "o.db")
    seq = _append(box, "a")
    row = box.mark_acked(seq, 5.0)
    assert row is not None
    assert row.item_id == "a"
    assert box.mark_acked(seq, 6.0) is None
    assert box.unacked == 0


def test_bound_prunes_acked_rows_first(tmp_path: Path) -> None:
    """When full, acknowledged rows go first and no unacknowledged row is lost."""
    box = Outbox(tmp_path / "o.db", max_rows=10)
    for i in range(8):
        box.mark_acked(_append(box, f"acked{i}"), 1.0)
    keep = [_append(box, f"open{i}") for i in range(2)]
    for i in range(5):
        keep.append(_append(box, f"more{i}"))
    stats = box.stats()
    assert stats.rows <= 10
    assert [r.seq for r in box.pending()] == keep
    assert (stats.dropped_expired, stats.dropped_actionable) == (0, 0)


def test_bound_drops_oldest_expired_unacked_then_actionable(tmp_path: Path) -> None:
    """Full of unacknowledged rows: the oldest whose deadline passed are dropped and counted;
    only when none has expired are actionable rows dropped (counted separately)."""
    box = Outbox(tmp_path / "o.db", max_rows=10)
    for i in range(5):
        _append(box, f"old{i}", deadline_ms=100.0)
    for i in range(5):
        _append(box, f"live{i}", deadline_ms=10_000.0)
    _append(box, "new", deadline_ms=10_000.0, now_ms=500.0)
    assert box.stats().dropped_expired == 1
    assert box.pending()[0].item_id == "old1"
    for i in range(4):
        _append(box, f"n{i}", deadline_ms=10_000.0, now_ms=500.0)
    assert box.stats().dropped_expired == 5
    _append(box, "overflow", deadline_ms=10_000.0, now_ms=500.0)
    stats = box.stats()
    assert stats.dropped_actionable == 1
    assert stats.rows == 10
    assert box.pending()[-1].item_id == "overflow"


def test_render_failure_rolls_back(tmp_path: Path) -> None:
    """If the payload cannot be rendered nothing is stored and the seq is not consumed."""
    box = Outbox(tmp_path / "o.db")

    def broken(_seq: int) -> bytes:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        box.append(item_id="x", topic="t", deadline_ms=1.0, captured_ms=None, decided_ms=0.0,
                   published_ms=0.0, now_ms=0.0, render=broken)
    assert _append(box, "y") == 1
    assert box.stats().rows == 1


class _FullDisk:
    """The outbox's database on a full disk: nothing can be written, reading still works."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.full = True

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
        if self.full and sql.lstrip().upper().startswith(("BEGIN", "INSERT", "DELETE")):
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def close(self) -> None:
        self.db.close()


def test_a_verdict_the_disk_cannot_take_is_still_handed_out_with_the_next_seq(
        tmp_path: Path) -> None:
    """Disk full: append still returns the row (rendered with the next seq) to be published;
    it is counted as not durable, and no seq is ever used twice once the disk has room."""
    box = Outbox(tmp_path / "o.db")
    assert _append(box, "a") == 1
    disk = _FullDisk(box._db)
    box._db = disk  # type: ignore[assignment]
    row = box.append(item_id="b", topic="t/verdict", deadline_ms=1.0, captured_ms=None,
                     decided_ms=0.0, published_ms=0.0, now_ms=0.0,
                     render=lambda seq: f'{{"seq":{seq}}}'.encode())
    assert (row.seq, row.payload) == (2, b'{"seq":2}')
    assert (box.unpersisted, box.write_failing) == (1, True)
    assert [r.seq for r in box.pending()] == [1]
    disk.full = False
    assert _append(box, "c") == 3
    assert box.write_failing is False
    box.close()
    assert _append(Outbox(tmp_path / "o.db"), "d") == 4


def test_verdicts_the_disk_cannot_take_wait_for_their_puback_in_a_small_bound(
        tmp_path: Path) -> None:
    """A long stretch of full disk: only the newest MAX_UNSTORED verdicts are kept in memory
    for their PUBACK, not as many as the outbox's 100,000 rows (a PUBACK that never comes,
    for a message paho dropped, used to keep one for good); the forgotten ones are
    reported dropped, and a PUBACK for one of them finds nothing to book."""
    box = Outbox(tmp_path / "o.db")
    box._db = _FullDisk(box._db)  # type: ignore[assignment]
    told: list[int] = []
    box.on_dropped = told.extend
    seqs = [_append(box, f"i{i}") for i in range(MAX_UNSTORED + 3)]
    assert box.unpersisted == len(seqs)
    assert told == seqs[:3]
    assert box.mark_acked(seqs[2], 1.0) is None
    kept = box.mark_acked(seqs[3], 1.0)
    assert kept is not None
    assert kept.item_id == "i3"


def test_rows_dropped_by_the_size_bound_are_reported(tmp_path: Path) -> None:
    """The seqs of unacknowledged rows the size bound drops are reported (so the publisher
    stops tracking them); pruned acknowledged rows are not."""
    box = Outbox(tmp_path / "o.db", max_rows=10)
    told: list[int] = []
    box.on_dropped = told.extend
    box.mark_acked(_append(box, "acked"), 1.0)
    expired = [_append(box, f"old{i}", deadline_ms=100.0) for i in range(2)]
    live = [_append(box, f"live{i}") for i in range(7)]
    _append(box, "new", now_ms=500.0)  # the acknowledged row goes first
    assert told == []
    _append(box, "newer", now_ms=500.0)
    assert told == expired[:1]
    for i in range(2):
        _append(box, f"more{i}", now_ms=500.0)
    assert told == [*expired, live[0]]
