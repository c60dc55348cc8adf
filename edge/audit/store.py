"""The audit snapshot ring store: a picture of why, for every sidelined item.

`SnapshotStore.offer` runs on the inference thread, so it only decides
whether the item gets a snapshot, assigns the ID (a timestamp and a counter:
cheap, sortable) and hands the record to a bounded queue; the verdict goes
out with that ID at once. A writer thread (``snapshot-writer``) renders and
writes the files (`edge.audit.files`) into a temporary directory and
renames it into place, then trims the store: oldest first, while it is over
its size cap, holds snapshots past their age, or leaves less than the
configured free space on the disk. When the queue is full the item gets no
snapshot (its verdict carries none) and the drop is counted: inference is
never held up by the disk.

Sidelined items are always offered; passed ones are sampled by a hash of
their item ID (`StorageConfig.snapshot_pass_sample`), so a rerun keeps the
same ones. Controller feedback becomes a ``label.json`` beside the sidecar
(`label`), which `edge-node snapshots export` bundles for retraining.

Given what judged the item (`context`: the block `edge.audit.replay.ModelContext` built on
the inference thread as the item was decided), a snapshot also records what `edge-node
replay` needs to judge its item again. A shadow disagreement (`offer_shadow`) is kept
whatever the sample: its block goes into the sidecar of the item's snapshot, made for it
when the item had none. Shadow snapshots yield to production's: taken only while the
writer's queue is less than half full, and evicted first when the store is over its size or
free-space limit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import re
import secrets
import shutil
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from edge.audit.files import (
    LABEL,
    SIDECAR,
    annotate_sidecar,
    disk_usage,
    read_sidecar,
    write_label,
    write_snapshot,
)
from edge.config import StorageConfig
from edge.durable import fsync_dir, sync_tree
from edge.types import Decision, ItemRecord, Verdict
from edge.workers import WorkerThread

log = structlog.get_logger(__name__)

#: Snapshot IDs: UTC time to the millisecond, a per-process tag, a counter.
ID_PATTERN = re.compile(r"^\d{8}T\d{9}-[0-9a-f]{4}-\d{6}$")
#: Item IDs remembered for feedback labels.
LABEL_MEMORY = 5000
_TMP_PREFIX = ".tmp-"
_MB = 1024 * 1024
_PRUNE_EVERY_S = 30.0
#: Why a snapshot was taken (the sidecar's ``kept_for``): production sidelined the item; the
#: pass sample kept it; only a shadow disagreement did (production kept no snapshot of it).
KEPT_FOR = ("sideline", "pass_sample", "shadow_only")


@dataclass(slots=True)
class SnapshotEntry:
    """One stored snapshot, as the store's index knows it."""

    snapshot_id: str
    created_s: float  # wall clock
    size_bytes: int
    item_id: str | None = None
    decision: str | None = None
    #: made for a shadow disagreement alone (production kept no snapshot of the item)
    shadow_only: bool = False


@dataclass(slots=True)
class SnapshotStats:
    saved: int = 0
    dropped_queue_full: int = 0
    skipped_disk_full: int = 0
    write_errors: int = 0
    evicted: dict[str, int] = dataclasses.field(
        default_factory=lambda: {"size": 0, "age": 0, "disk": 0})
    labels: int = 0
    labels_unmatched: int = 0


@dataclass(frozen=True, slots=True)
class _Write:
    record: ItemRecord
    verdict: Verdict
    kept_for: str  # one of KEPT_FOR
    context: Mapping[str, Any] | None = None
    shadow: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class _Annotate:
    snapshot_id: str
    key: str
    value: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class _Label:
    snapshot_id: str
    label: dict[str, Any]


def keep_passed(item_id: str, sample: float) -> bool:
    """Deterministic sample of passed items: the same IDs are kept on every run."""
    return zlib.crc32(item_id.encode("utf-8")) < sample * 2**32


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


class SnapshotStore:
    """Bounded on-disk store of audit snapshots, written off the hot path."""

    def __init__(self, root: Path, cfg: StorageConfig, *, queue_size: int = 32,
                 wall: Callable[[], float] = time.time,
                 free_bytes: Callable[[Path], int] = _free_bytes) -> None:
        self.root = Path(root)
        self.cfg = cfg
        self.max_bytes = int(cfg.snapshots_max_mb * _MB)
        self.max_age_s = cfg.snapshots_max_age_h * 3600.0
        self.min_free_bytes = int(cfg.snapshots_min_free_mb * _MB)
        self.stats = SnapshotStats()
        self._wall = wall
        self._free = free_bytes
        self._queue: queue.Queue[_Write | _Label | _Annotate | None] = queue.Queue(
            maxsize=queue_size)
        self._tag = secrets.token_hex(2)
        self._seq = 0
        self._lock = threading.Lock()
        self._index: OrderedDict[str, SnapshotEntry] = OrderedDict()
        self._shadow_only: OrderedDict[str, None] = OrderedDict()  # evicted first, oldest first
        self._by_item: OrderedDict[str, str] = OrderedDict()
        self._total = 0
        self._recent_sizes: list[int] = []
        # Woken by a sentinel on its queue rather than at its next poll.
        self._worker = WorkerThread("snapshot-writer", self._run, wake=self._wake_writer)
        self.root.mkdir(parents=True, exist_ok=True)
        self._scan()

    # --- hot path -------------------------------------------------------------------------

    def offer(self, record: ItemRecord, verdict: Verdict,
              context: Mapping[str, Any] | None = None) -> Verdict:
        """The verdict, with a snapshot ID when this item gets a snapshot (never blocks);
        `context`: what judged the item (the sidecar's ``replay`` block)."""
        sidelined = verdict.decision is Decision.SIDELINE
        if not sidelined and not keep_passed(verdict.item_id, self.cfg.snapshot_pass_sample):
            return verdict
        tagged = self._keep(record, verdict, "sideline" if sidelined else "pass_sample",
                            context, None)
        if tagged is None:
            with self._lock:
                self.stats.dropped_queue_full += 1
        return tagged or verdict

    def offer_shadow(self, record: ItemRecord, verdict: Verdict, shadow: Mapping[str, Any],
                     *, context: Mapping[str, Any] | None = None) -> str | None:
        """Keep a shadow disagreement about a judged item (`verdict`: production's, as it
        went out; `context`: what judged it, as for `offer`): `shadow` goes into the sidecar
        of the item's snapshot, or of one made now when the item has none. Never blocks;
        returns the snapshot ID, or None when the writer's queue is half full or more (left
        to production's snapshots; the caller counts it)."""
        if self._queue.qsize() * 2 >= self._queue.maxsize:
            return None
        if verdict.snapshot_id is not None:
            try:
                self._queue.put_nowait(_Annotate(verdict.snapshot_id, "shadow", shadow))
            except queue.Full:
                return None
            return verdict.snapshot_id
        tagged = self._keep(record, verdict, "shadow_only", context, shadow)
        return None if tagged is None else tagged.snapshot_id

    def _keep(self, record: ItemRecord, verdict: Verdict, kept_for: str,
              context: Mapping[str, Any] | None,
              shadow: Mapping[str, Any] | None) -> Verdict | None:
        """Assign an ID and queue the snapshot; None when the queue is full."""
        with self._lock:
            self._seq += 1
            seq = self._seq
        now = self._wall()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
        snapshot_id = f"{stamp}{int(now * 1000) % 1000:03d}-{self._tag}-{seq % 1_000_000:06d}"
        tagged = dataclasses.replace(verdict, snapshot_id=snapshot_id)
        try:
            self._queue.put_nowait(_Write(record, tagged, kept_for, context, shadow))
        except queue.Full:
            return None
        with self._lock:
            self._by_item[verdict.item_id] = snapshot_id
            while len(self._by_item) > LABEL_MEMORY:
                self._by_item.popitem(last=False)
        return tagged

    def label(self, item_id: str, kind: str, *, received_ms: float | None = None,
              note: str | None = None) -> bool:
        """Record what controller feedback said about an item; False if it has no snapshot."""
        with self._lock:
            snapshot_id = self._by_item.get(item_id)
        if snapshot_id is None:
            with self._lock:
                self.stats.labels_unmatched += 1
            log.info("snapshot_label_unmatched", item_id=item_id, kind=kind)
            return False
        label = {"item_id": item_id, "kind": kind, "note": note,
                 "received_ms": received_ms if received_ms is not None else self._wall() * 1000}
        try:  # on the MQTT client's thread: never wait
            self._queue.put_nowait(_Label(snapshot_id, label))
        except queue.Full:
            with self._lock:
                self.stats.labels_unmatched += 1
            log.warning("snapshot_label_dropped", item_id=item_id, why="writer queue full")
            return False
        return True

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._worker.start()

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (within `timeout_s`), then stop the writer."""
        self.flush(timeout_s)
        self._worker.stop(timeout_s)
        left = sum(1 for job in list(self._queue.queue) if job is not None)
        if left:
            with self._lock:
                self.stats.dropped_queue_full += left
            log.warning("snapshots_not_written_on_shutdown", count=left)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every queued snapshot and label is on disk."""
        until = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks:
            if time.monotonic() > until or not self._worker.alive:
                return False
            time.sleep(0.01)
        return True

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    # --- writer thread ----------------------------------------------------------------------

    def _wake_writer(self) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)

    def _run(self, stop: threading.Event) -> None:
        next_prune = time.monotonic() + _PRUNE_EVERY_S
        while not stop.is_set():
            try:
                job = self._queue.get(timeout=0.2)
            except queue.Empty:
                if time.monotonic() > next_prune:
                    next_prune = time.monotonic() + _PRUNE_EVERY_S
                    try:
                        self._trim(0)
                    except Exception:  # a disk error must not end the writer thread
                        log.exception("snapshot_prune_failed")
                continue
            if job is None:
                self._queue.task_done()
                continue
            try:
                if isinstance(job, _Write):
                    self._save(job)
                elif isinstance(job, _Label):
                    self._apply_label(job)
                else:
                    self._annotate(job)
            except Exception:  # keep writing the next ones; the error is counted and logged
                self.stats.write_errors += 1
                log.exception("snapshot_write_failed")
            finally:
                self._queue.task_done()

    def _save(self, job: _Write) -> None:
        verdict = job.verdict
        snapshot_id = verdict.snapshot_id
        assert snapshot_id is not None
        expected = max(self._recent_sizes, default=256 * 1024)
        self._trim(expected)
        if self._free(self.root) - expected < self.min_free_bytes:
            self.stats.skipped_disk_full += 1
            log.warning("snapshot_skipped_disk_full", snapshot_id=snapshot_id,
                        free_mb=round(self._free(self.root) / _MB, 1))
            return
        tmp = self.root / (_TMP_PREFIX + snapshot_id)
        tmp.mkdir()
        try:
            write_snapshot(tmp, job.record, verdict, self._wall() * 1000.0,
                           kept_for=job.kept_for, replay=job.context, shadow=job.shadow)
            size = disk_usage(tmp)
            sync_tree(tmp)
            tmp.rename(self.root / snapshot_id)
            fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._recent_sizes = [*self._recent_sizes[-7:], size]
        shadow_only = job.kept_for == "shadow_only"
        with self._lock:
            self._index[snapshot_id] = SnapshotEntry(snapshot_id, self._wall(), size,
                                                     verdict.item_id, verdict.decision.value,
                                                     shadow_only)
            if shadow_only:
                self._shadow_only[snapshot_id] = None
            self._total += size
        self.stats.saved += 1
        self._trim(0)

    def _apply_label(self, job: _Label) -> None:
        path = self.path(job.snapshot_id)
        if path is None:
            with self._lock:
                self.stats.labels_unmatched += 1
            log.info("snapshot_label_unmatched", snapshot_id=job.snapshot_id,
                     why="snapshot not stored (dropped or evicted)")
            return
        self._rewrite(job.snapshot_id, path / LABEL, lambda: write_label(path, job.label))
        self.stats.labels += 1

    def _annotate(self, job: _Annotate) -> None:
        path = self.path(job.snapshot_id)
        if path is None:
            log.warning("snapshot_annotation_lost", snapshot_id=job.snapshot_id, key=job.key,
                        why="snapshot not stored (dropped, failed or evicted)")
            return
        self._rewrite(job.snapshot_id, path / SIDECAR,
                      lambda: annotate_sidecar(path, job.key, job.value))

    def _rewrite(self, snapshot_id: str, file: Path, write: Callable[[], None]) -> None:
        """Write one file of a stored snapshot, keeping the store's size account."""
        before = disk_usage(file) if file.exists() else 0
        write()
        grown = disk_usage(file) - before
        with self._lock:
            if snapshot_id in self._index:
                self._index[snapshot_id].size_bytes += grown
                self._total += grown

    def _trim(self, incoming: int) -> None:
        """Delete snapshots until `incoming` more bytes fit every limit: past their age the
        oldest; for space, shadow-only snapshots first (oldest first), then the oldest."""
        now = self._wall()
        while True:
            with self._lock:
                if not self._index:
                    return
                oldest = next(iter(self._index.values()))
                shadow = next(iter(self._shadow_only), None)
                first = oldest if shadow is None else self._index[shadow]
                total = self._total
            if total + incoming > self.max_bytes:
                why, victim = "size", first
            elif now - oldest.created_s > self.max_age_s:
                why, victim = "age", oldest
            elif self._free(self.root) - incoming < self.min_free_bytes:
                why, victim = "disk", first
            else:
                return
            self._evict(victim, why)

    def _evict(self, entry: SnapshotEntry, why: str) -> None:
        shutil.rmtree(self.root / entry.snapshot_id, ignore_errors=True)
        with self._lock:
            self._index.pop(entry.snapshot_id, None)
            self._shadow_only.pop(entry.snapshot_id, None)
            self._total -= entry.size_bytes
            self.stats.evicted[why] += 1
        log.debug("snapshot_evicted", snapshot_id=entry.snapshot_id, why=why)

    def _scan(self) -> None:
        """Index what a previous run left (oldest first); remove half-written ones."""
        for child in sorted(self.root.iterdir()):
            if child.name.startswith(_TMP_PREFIX):
                shutil.rmtree(child, ignore_errors=True)
            elif child.is_dir() and ID_PATTERN.match(child.name):
                size = disk_usage(child)
                self._index[child.name] = SnapshotEntry(child.name, child.stat().st_mtime, size)
                self._total += size

    # --- reading (live page, export) ----------------------------------------------------------

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return self._total

    def ids(self) -> list[str]:
        """Stored snapshot IDs, oldest first."""
        with self._lock:
            return list(self._index)

    def path(self, snapshot_id: str) -> Path | None:
        """The directory of a stored snapshot; None for unknown or malformed IDs."""
        if not ID_PATTERN.match(snapshot_id):
            return None
        with self._lock:
            known = snapshot_id in self._index
        return self.root / snapshot_id if known else None

    def sidecar(self, snapshot_id: str) -> dict[str, Any] | None:
        path = self.path(snapshot_id)
        if path is None:
            return None
        try:
            return read_sidecar(path)
        except (OSError, ValueError):
            return None  # evicted meanwhile, or a damaged file

    def recent(self, n: int, decision: str | None = "sideline") -> list[dict[str, Any]]:
        """Sidecars of the newest `n` snapshots (of one decision), newest first."""
        out: list[dict[str, Any]] = []
        for snapshot_id in reversed(self.ids()):
            data = self.sidecar(snapshot_id)
            if data is not None and (decision is None
                                     or data["verdict"]["decision"] == decision):
                out.append(data)
                if len(out) >= n:
                    break
        return out

    def since(self, since_s: float) -> Iterator[Path]:
        """Directories of snapshots created at or after `since_s` (wall clock), oldest first."""
        with self._lock:
            entries = [e for e in self._index.values() if e.created_s >= since_s]
        for e in entries:
            path = self.root / e.snapshot_id
            if path.is_dir():
                yield path

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Add the store's counters to a node's Prometheus registry."""
        registry.register(_StoreCollector(self))


class _StoreCollector(Collector):
    def __init__(self, store: SnapshotStore) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        st = self._store.stats
        saved = CounterMetricFamily("cv_snapshots_saved", "Audit snapshots written")
        saved.add_metric([], st.saved)
        yield saved
        lost = CounterMetricFamily("cv_snapshots_lost", "Snapshots not written",
                                   labels=["why"])
        lost.add_metric(["queue_full"], st.dropped_queue_full)
        lost.add_metric(["disk_full"], st.skipped_disk_full)
        lost.add_metric(["error"], st.write_errors)
        yield lost
        evicted = CounterMetricFamily("cv_snapshots_evicted", "Snapshots deleted by the ring",
                                      labels=["why"])
        for why, n in st.evicted.items():
            evicted.add_metric([why], n)
        yield evicted
        size = GaugeMetricFamily("cv_snapshots_bytes", "Disk space the snapshots use")
        size.add_metric([], self._store.total_bytes)
        yield size
        count = GaugeMetricFamily("cv_snapshots_stored", "Snapshots in the store")
        count.add_metric([], len(self._store.ids()))
        yield count
        depth = GaugeMetricFamily("cv_snapshots_queue_depth", "Snapshots waiting to be written")
        depth.add_metric([], self._store.queue_depth)
        yield depth
