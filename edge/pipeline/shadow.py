"""Shadow scoring: a candidate model set judges every item the production models judged, off
the critical path, and never decides anything.

The inference stage hands each judged item (its record, the verdict that went out and what
judged it, `edge.audit.replay.ModelContext`) to `ShadowScorer.offer` once the verdict is
with the scheduler: a put into a bounded queue (`models.shadow.max_queue`) that never waits.
The item is skipped (and counted) when the queue is full, or when the node is behind (a full
batch of items waits for the production models). The ``shadow-scorer`` thread scores one
item at a time with the candidate's own `ItemInspector` and `VerdictPolicy` (the node's code
path, on the candidate's manifest), and only while the production models are idle (nothing
waits for them, no batch in progress): the two share the cores, and at most one item's
scoring overlaps a production batch. For each item it:

* publishes a message on ``…/shadow`` (``schemas/shadow.schema.json``; QoS 0, only while
  connected: never stored in the outbox);
* keeps an audit snapshot marked as a shadow disagreement when the decisions differ
  (`SnapshotStore.offer_shadow`: the candidate's verdict in the sidecar's ``shadow`` block),
  at most `models.shadow.max_snapshots_per_minute`, and only while the snapshot writer has
  room to spare: a bad candidate never crowds out production's audit trail;
* counts: the Prometheus metrics and the `ShadowRecord` at ``state_dir / SHADOW_RECORD_FILE``
  (written at most once a second, and at the stop), which the update gate reads. The record
  belongs to one candidate (its manifest's sha256): a restart with the same candidate counts
  on from it. An item on which the candidate's models raise is counted as failed.

The candidate loads on the ``shadow-scorer`` thread once the node runs (golden self-test,
perhaps a gallery re-embedded in memory): production never waits on its candidate. A reload
(SIGHUP) prepares the candidate anew from the configured manifest beside the running one,
with the production reload's checks (`edge.infer.reload.prepare_reload`: files' sha256,
thresholds and fusion, golden self-test); a missing or broken candidate is refused and the
one in use, if any, kept. Whatever goes wrong with one item is logged and counted, and the
thread goes on; a thread that ended anyway shows in `cv_shadow_worker_up` and the node's
degraded list, never in production.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from edge.audit.files import verdict_json
from edge.audit.shadow_record import (
    SHADOW_RECORD_FILE,
    ShadowRecord,
    load_shadow_record,
    write_shadow_record,
)
from edge.audit.store import SnapshotStore
from edge.clock import Clock
from edge.config import Config, DecisionConfig
from edge.infer.backend import BackendError
from edge.infer.inspector import ItemInspector
from edge.infer.manifest import ManifestError
from edge.infer.reload import ModelRejectedError, prepare_reload
from edge.pipeline.stage_thread import BoundedQueue
from edge.publish.payloads import SCHEMA_VERSION, dumps, verdict_payload
from edge.types import Decision, ItemRecord, Verdict
from edge.verdicts.policy import VerdictPolicy
from edge.workers import WorkerThread

log = structlog.get_logger(__name__)

#: The shadow record is rewritten at most this often (and once more at the stop).
RECORD_EVERY_S = 1.0
#: Disagreements, by what the candidate would have done differently.
CANDIDATE_SIDELINES = "candidate_sidelines"
CANDIDATE_PASSES = "candidate_passes"
#: Why a judged item was not tried by the candidate.
SKIP_REASONS = ("queue_full", "behind", "shutdown")
#: What became of a disagreement's snapshot: kept, over the per-minute cap, or left to
#: production's snapshots (the writer's queue half full or more, or none configured).
SNAPSHOT_OUTCOMES = ("kept", "rate_limited", "store_busy")
#: The parts of a verdict message a shadow message repeats, for each model set.
_VERDICT_PARTS = ("decision", "reasons", "scores", "threshold_version", "model_versions")
#: Sends one shadow message; False when it could not be handed to the broker connection.
Publish = Callable[[bytes], bool]
#: How often the scorer looks whether the production models are idle again.
_IDLE_POLL_S = 0.005


@dataclass(frozen=True, slots=True)
class Candidate:
    """A candidate model set, loaded and golden-tested, with the policy of its thresholds."""

    inspector: ItemInspector
    policy: VerdictPolicy
    path: Path
    sha256: str  # of the manifest file, as loaded

    @property
    def version(self) -> str:
        return self.inspector.manifest.version

    def describe(self) -> dict[str, str]:
        return {"path": str(self.path), "version": self.version, "sha256": self.sha256}


def load_candidate(running: ItemInspector, manifest_path: Path,
                   decision: DecisionConfig) -> Candidate:
    """Open the candidate's models beside the running ones, as a reload would, with the
    running gallery (or, for another embedding model, one re-embedded in memory, never
    written). Raises what `prepare_reload` raises."""
    prepared = prepare_reload(running, manifest_path)
    gallery = prepared.gallery if prepared.gallery is not None else running.gallery
    inspector = ItemInspector(prepared.manifest, prepared.embedding, prepared.damage,
                              gallery=gallery, catalogue=running.catalogue, cfg=running.cfg)
    return Candidate(inspector, VerdictPolicy.from_manifest(prepared.manifest, decision),
                     manifest_path, prepared.manifest.sha256)


def disagreement(production: Decision, candidate: Decision) -> str | None:
    """Which way the candidate disagrees with production; None when they agree."""
    if production is candidate:
        return None
    return CANDIDATE_SIDELINES if candidate is Decision.SIDELINE else CANDIDATE_PASSES


@dataclass(slots=True)
class ShadowTally:
    """What one candidate did in shadow: the `ShadowRecord`'s numbers, by direction too."""

    scored: int = 0
    skipped: int = 0
    agreements: int = 0
    sidelined_candidate: int = 0
    sidelined_production: int = 0
    failed: int = 0

    @staticmethod
    def resumed(record: ShadowRecord | None, sha256: str) -> ShadowTally:
        """The counts of `record` when it is this candidate's, else none."""
        if record is None or record.candidate_sha256 != sha256:
            return ShadowTally()
        return ShadowTally(record.items_scored, record.items_skipped, record.agreements,
                           record.sidelined_candidate, record.sidelined_production,
                           record.items_failed)

    def disagreements(self) -> dict[str, int]:
        """By direction: the difference in sidelines is the one direction's surplus."""
        total = self.scored - self.agreements
        surplus = self.sidelined_candidate - self.sidelined_production
        sidelines = (total + surplus) // 2
        return {CANDIDATE_SIDELINES: sidelines, CANDIDATE_PASSES: total - sidelines}

    def count(self, production: Decision, candidate: Decision) -> None:
        self.scored += 1
        self.agreements += production is candidate
        self.sidelined_production += production is Decision.SIDELINE
        self.sidelined_candidate += candidate is Decision.SIDELINE

    def record(self, candidate: Candidate, now_ms: float) -> ShadowRecord:
        return ShadowRecord(candidate.version, candidate.sha256, self.scored, self.skipped,
                            self.agreements, self.sidelined_candidate, self.sidelined_production,
                            now_ms, self.failed)


@dataclass(slots=True)
class ShadowCounters:
    """Since the node started (Prometheus counters): skips by why, candidate loads, messages
    and disagreement snapshots by outcome, errors of the scorer itself (not of the
    candidate's models)."""

    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    messages: dict[str, int] = field(
        default_factory=lambda: {"published": 0, "not_sent": 0})
    snapshots: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(SNAPSHOT_OUTCOMES, 0))
    loads: dict[str, int] = field(default_factory=lambda: {"loaded": 0, "refused": 0})
    errors: int = 0

    def copy(self) -> ShadowCounters:
        return ShadowCounters(dict(self.skipped), dict(self.messages), dict(self.snapshots),
                              dict(self.loads), self.errors)


@dataclass(frozen=True, slots=True)
class _Offered:
    """A judged item waiting for the candidate, with what judged it in production."""

    record: ItemRecord
    verdict: Verdict
    context: Mapping[str, Any] | None


class _PerMinute:
    """At most `per_minute` events a minute, in bursts of up to that many (a token bucket)."""

    def __init__(self, per_minute: int) -> None:
        self._rate = per_minute / 60.0
        self._cap = float(per_minute)
        self._tokens = self._cap
        self._at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._cap, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


def shadow_payload(record: ItemRecord, production: Verdict, candidate: Verdict, *,
                   candidate_info: Mapping[str, str], snapshot_id: str | None, node_id: str,
                   line_id: str, now_ms: float) -> dict[str, object]:
    """The ``…/shadow`` message: both verdicts in the verdict message's own terms."""

    def parts(verdict: Verdict) -> dict[str, object]:
        # The verdict message's own rendering; its seq and timestamps are not used here.
        full = verdict_payload(verdict, node_id=node_id, line_id=line_id, seq=1,
                               published_ms=now_ms)
        return {k: full[k] for k in _VERDICT_PARTS}

    return {
        "schema_version": SCHEMA_VERSION, "node_id": node_id, "line_id": line_id,
        "item_id": record.item_id, "product_id": record.product_id,
        "production": parts(production),
        "candidate": {**parts(candidate), "manifest_version": candidate_info["version"],
                      "manifest_sha256": candidate_info["sha256"]},
        "agree": production.decision is candidate.decision,
        "disagreement": disagreement(production.decision, candidate.decision),
        "snapshot_id": snapshot_id,
        "timestamps": {"decided": round(production.decided_ms), "scored": round(now_ms)},
    }


class ShadowScorer:
    """Scores judged items with a candidate model set on its own thread (see the module)."""

    def __init__(self, manifest_path: Path, running: ItemInspector, decision: DecisionConfig,
                 clock: Clock, *, record_path: Path, max_queue: int, max_batch: int,
                 node_id: str, line_id: str, snapshots: SnapshotStore | None = None,
                 max_snapshots_per_minute: int = 30,
                 wall_ms: Callable[[], float] | None = None) -> None:
        self.manifest_path = manifest_path
        self.record_path = record_path
        self._running = running
        self._decision = decision
        self._clock = clock
        self._wall_ms = wall_ms or (lambda: time.time() * 1000.0)
        self._max_batch = max_batch
        self._ids = (node_id, line_id)
        self._snapshots = snapshots
        self._snapshot_budget = _PerMinute(max_snapshots_per_minute)
        self._queue: BoundedQueue[_Offered] = BoundedQueue("shadow", max_queue)
        self._publish: Publish | None = None
        self._queued: Callable[[], int] = lambda: 0
        self._deciding: Callable[[], bool] = lambda: False
        self._lock = threading.Lock()  # the candidate with its tally, the counters
        self._swap = threading.Lock()  # scoring an item and a candidate swap exclude each other
        self._load_lock = threading.Lock()  # one candidate load at a time
        self._write_lock = threading.Lock()  # record writes in the order their data was taken
        self._candidate: Candidate | None = None
        self._tally = ShadowTally()
        self.counters = ShadowCounters()
        self._dirty = False
        self._written_mono = 0.0
        self._loads = 0  # load attempts: none yet when started, the thread loads first
        self._stopping = False
        self._closed = False
        self._worker = WorkerThread("shadow-scorer", self._run)

    @staticmethod
    def from_config(cfg: Config, running: ItemInspector, clock: Clock, *,
                    snapshots: SnapshotStore | None = None) -> ShadowScorer | None:
        """The scorer of `models.shadow` (None: shadow scoring off); its candidate loads on
        its own thread once started."""
        shadow = cfg.models.shadow
        if shadow.manifest is None:
            return None
        return ShadowScorer(shadow.manifest, running, cfg.decision, clock,
                            record_path=Path(cfg.storage.state_dir) / SHADOW_RECORD_FILE,
                            max_queue=shadow.max_queue, max_batch=cfg.models.max_batch,
                            node_id=cfg.node.node_id, line_id=cfg.node.line_id,
                            snapshots=snapshots,
                            max_snapshots_per_minute=shadow.max_snapshots_per_minute)

    def attach(self, publish: Publish, queued: Callable[[], int],
               deciding: Callable[[], bool]) -> None:
        """What the node gives the scorer before it starts: how to send a shadow message, how
        many items wait for the production models, whether they are deciding a batch."""
        self._publish = publish
        self._queued = queued
        self._deciding = deciding

    # --- the inference thread ---------------------------------------------------------------

    def offer(self, record: ItemRecord, verdict: Verdict,
              context: Mapping[str, Any] | None = None) -> None:
        """A judged item, its verdict already out (`context`: what judged it, for a
        disagreement's snapshot): queued for the candidate, or skipped."""
        if self._candidate is None:  # none loaded (yet): nothing to score it with
            return
        if self._queued() >= self._max_batch:
            self._skip("behind")
        elif not self._queue.put_nowait_or_drop(_Offered(record, verdict, context)):
            self._skip("queue_full")

    # --- lifecycle ----------------------------------------------------------------------------

    @property
    def candidate(self) -> Candidate | None:
        return self._candidate

    @property
    def worker_up(self) -> bool:
        """The scoring thread runs (False before the start and after the stop too)."""
        return self._worker.alive

    @property
    def dead(self) -> bool:
        """The scoring thread ended without being stopped."""
        return self._worker.started and not self._worker.alive and not self._stopping

    def start(self) -> None:
        """Start the scoring thread; it loads the candidate first unless a `reload` did."""
        self._worker.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Score what is queued (within half of `timeout_s`; the rest is skipped), write the
        record, close the candidate (not while an item is still being scored: the process
        ends with it)."""
        self._stopping = True
        until = time.monotonic() + timeout_s / 2
        while self._queue.depth() and self._worker.alive and time.monotonic() < until:
            time.sleep(0.01)
        self._worker.stop(timeout_s / 4)
        while self._queue.get_nowait() is not None:
            self._skip("shutdown")
        self._write_record(force=True)
        if not self._swap.acquire(timeout=timeout_s / 4):
            log.warning("shadow_candidate_not_closed", why="an item is still being scored")
            return
        try:
            self._closed = True
            with self._lock:
                candidate, self._candidate = self._candidate, None
        finally:
            self._swap.release()
        if candidate is not None:
            candidate.inspector.close()

    def reload(self) -> str | None:
        """Load the configured candidate anew and switch to it between two items; returns
        why it was refused (the candidate in use, if any, is kept), or None."""
        with self._load_lock:
            self._loads += 1
            t0 = time.monotonic()
            log.info("shadow_candidate_loading", manifest=str(self.manifest_path))
            try:
                new = load_candidate(self._running, self.manifest_path, self._decision)
            except (ModelRejectedError, ManifestError, BackendError, OSError) as exc:
                return self._refused(str(exc))
            except Exception as exc:  # whatever a candidate does wrong, production runs on
                log.exception("shadow_candidate_failed", manifest=str(self.manifest_path))
                return self._refused(f"{type(exc).__name__}: {exc}")
            return self._switch(new, time.monotonic() - t0)

    def _switch(self, new: Candidate, load_s: float) -> str | None:
        resumed = ShadowTally.resumed(load_shadow_record(self.record_path), new.sha256)
        with self._swap:
            if self._closed:  # stopped while it loaded
                new.inspector.close()
                return "the shadow scorer has stopped"
            old = self._candidate
            if old is not None:
                self._write_record(force=True)
            with self._lock:
                if old is None or old.sha256 != new.sha256:
                    self._tally = resumed
                self._candidate = new
                self._dirty = True
                self.counters.loads["loaded"] += 1
                scored = self._tally.scored
        if old is not None:
            old.inspector.close()
        log.info("shadow_candidate_loaded", **new.describe(),
                 versions=new.inspector.model_versions(),
                 thresholds=new.policy.thresholds.version, scored_before=scored,
                 seconds=round(load_s, 1))
        return None

    def _refused(self, error: str) -> str:
        with self._lock:
            self.counters.loads["refused"] += 1
        kept = None if self._candidate is None else self._candidate.describe()
        log.error("shadow_candidate_refused", manifest=str(self.manifest_path), error=error,
                  kept=kept)
        return error

    # --- the shadow-scorer thread -------------------------------------------------------------

    def _run(self, stop: threading.Event) -> None:
        if self._loads == 0:
            self.reload()  # never raises: a refused candidate is logged
        while not stop.is_set():
            offered = self._queue.get(0.2)
            try:
                if offered is not None and self._wait_for_production(stop):
                    with self._swap:
                        self._score(offered)
                self._write_record()
            except Exception:  # one item's trouble is logged and counted; the next is scored
                log.exception("shadow_item_failed", item_id=None if offered is None
                              else offered.record.item_id)
                with self._lock:
                    self.counters.errors += 1

    def _wait_for_production(self, stop: threading.Event) -> bool:
        """Until nothing waits for the production models; False (skipped) at the stop."""
        while self._queued() or self._deciding():
            if stop.wait(_IDLE_POLL_S):
                self._skip("shutdown")
                return False
        return True

    def _score(self, offered: _Offered) -> None:
        candidate = self._candidate
        if candidate is None:
            return
        record = offered.record
        try:
            result = candidate.inspector.infer([record])[0]
            verdict = candidate.policy.decide(record, result, self._clock.now_ms())
        except Exception:  # a failing candidate costs its own scores, never the node
            log.exception("shadow_scoring_failed", item_id=record.item_id)
            with self._lock:
                self._tally.failed += 1
                self._dirty = True
            return
        self._judged(candidate, offered, verdict)

    def _judged(self, candidate: Candidate, offered: _Offered, verdict: Verdict) -> None:
        record, production = offered.record, offered.verdict
        with self._lock:
            self._tally.count(production.decision, verdict.decision)
            self._dirty = True
        direction = disagreement(production.decision, verdict.decision)
        snapshot_id = production.snapshot_id
        if direction is not None:
            log.info("shadow_disagreement", item_id=record.item_id, direction=direction,
                     production=production.decision.value, candidate=verdict.decision.value)
            snapshot_id = (self._keep_disagreement(candidate, offered, verdict, direction)
                           or production.snapshot_id)
        self._send(shadow_payload(
            record, production, verdict, candidate_info=candidate.describe(),
            snapshot_id=snapshot_id, node_id=self._ids[0], line_id=self._ids[1],
            now_ms=self._clock.now_ms()))

    def _keep_disagreement(self, candidate: Candidate, offered: _Offered, verdict: Verdict,
                           direction: str) -> str | None:
        """The disagreement's snapshot, within its budget; its ID, or None if not kept."""
        if not self._snapshot_budget.take():
            outcome, snapshot_id = "rate_limited", None
        else:
            snapshot_id = None if self._snapshots is None else self._snapshots.offer_shadow(
                offered.record, offered.verdict, {
                    "disagreement": direction, "candidate_manifest": candidate.describe(),
                    "candidate": verdict_json(dataclasses.replace(
                        verdict, anomaly_map=None, anomaly_camera=None))},
                context=offered.context)
            outcome = "store_busy" if snapshot_id is None else "kept"
        with self._lock:
            self.counters.snapshots[outcome] += 1
        return snapshot_id

    def _send(self, payload: Mapping[str, object]) -> None:
        publish = self._publish
        try:
            sent = publish is not None and publish(dumps(payload))
        except (ValueError, RuntimeError, OSError):  # never the scorer's end
            log.exception("shadow_publish_failed")
            sent = False
        with self._lock:
            self.counters.messages["published" if sent else "not_sent"] += 1

    def _skip(self, why: str) -> None:
        with self._lock:
            self._tally.skipped += 1
            self.counters.skipped[why] += 1
            self._dirty = True

    def _write_record(self, *, force: bool = False) -> None:
        """The record, when it changed, at most every `RECORD_EVERY_S` unless `force`. The
        candidate and its tally are read together, and the writes land in the order they
        were read: an older record never replaces a newer one."""
        with self._write_lock:
            now = time.monotonic()
            with self._lock:
                candidate = self._candidate
                if candidate is None or not self._dirty:
                    return
                if not force and now - self._written_mono < RECORD_EVERY_S:
                    return
                record = self._tally.record(candidate, self._wall_ms())
                self._dirty = False
                self._written_mono = now
            try:
                write_shadow_record(self.record_path, record)
            except OSError as exc:  # counted on: written again with the next change
                with self._lock:
                    self._dirty = True
                log.error("shadow_record_write_failed", path=str(self.record_path),
                          error=str(exc))

    # --- metrics ------------------------------------------------------------------------------

    def snapshot(self) -> tuple[Candidate | None, ShadowTally, ShadowCounters, int]:
        """The candidate, its tally, the counters since start and the queue depth (copies)."""
        with self._lock:
            return (self._candidate, dataclasses.replace(self._tally), self.counters.copy(),
                    self._queue.depth())

    def register_metrics(self, registry: CollectorRegistry) -> None:
        registry.register(_ShadowCollector(self))


def _share(part: int, whole: int) -> float:
    """NaN of nothing: a rate over no items is unknown, not 0."""
    return part / whole if whole else math.nan


class _ShadowCollector(Collector):
    def __init__(self, scorer: ShadowScorer) -> None:
        self._scorer = scorer

    def collect(self) -> Iterator[Metric]:
        candidate, tally, counters, depth = self._scorer.snapshot()
        yield from self._candidate_figures(candidate, tally)
        skipped = CounterMetricFamily("cv_shadow_items_skipped", "Judged items the candidate "
                                      "did not try, since the node started", labels=["why"])
        for why, n in counters.skipped.items():
            skipped.add_metric([why], n)
        yield skipped
        messages = CounterMetricFamily("cv_shadow_messages", "Shadow messages, by outcome "
                                       "(not_sent: the broker was away), since the node "
                                       "started", labels=["outcome"])
        for outcome, n in counters.messages.items():
            messages.add_metric([outcome], n)
        yield messages
        snapshots = CounterMetricFamily(
            "cv_shadow_snapshots", "Disagreement snapshots, by outcome (rate_limited: over "
            "models.shadow.max_snapshots_per_minute; store_busy: left to production's), since "
            "the node started", labels=["outcome"])
        for outcome, n in counters.snapshots.items():
            snapshots.add_metric([outcome], n)
        yield snapshots
        loads = CounterMetricFamily("cv_shadow_candidate_loads", "Candidate loads (at the "
                                    "start and on reload), by outcome (refused: missing or "
                                    "broken, logged), since the node started",
                                    labels=["outcome"])
        for outcome, n in counters.loads.items():
            loads.add_metric([outcome], n)
        yield loads
        yield CounterMetricFamily("cv_shadow_worker_errors", "Items the scorer itself failed "
                                  "on (logged; not the candidate's models), since the node "
                                  "started", value=counters.errors)
        yield GaugeMetricFamily("cv_shadow_worker_up", "The shadow scoring thread runs (1)",
                                value=1.0 if self._scorer.worker_up else 0.0)
        yield GaugeMetricFamily("cv_shadow_queue_depth", "Judged items waiting for the "
                                "candidate", value=depth)

    @staticmethod
    def _candidate_figures(candidate: Candidate | None, tally: ShadowTally) -> Iterator[Metric]:
        """The current candidate's figures on this device (its record's): gauges, since a
        new candidate starts from its own."""
        info = GaugeMetricFamily("cv_shadow_candidate_info", "The candidate model set scored "
                                 "in shadow (none: no series)", labels=["version", "sha256"])
        if candidate is not None:
            info.add_metric([candidate.version, candidate.sha256], 1.0)
        yield info
        yield GaugeMetricFamily("cv_shadow_items_scored", "Judged items the candidate "
                                "scored (this candidate, on this device)", value=tally.scored)
        yield GaugeMetricFamily("cv_shadow_items_failed", "Judged items on which the "
                                "candidate's models raised (this candidate, on this device)",
                                value=tally.failed)
        yield GaugeMetricFamily("cv_shadow_agreement", "Share of scored items where candidate "
                                "and production decided alike (NaN: none scored)",
                                value=_share(tally.agreements, tally.scored))
        sideline = GaugeMetricFamily("cv_shadow_sideline_rate", "Share of scored items each "
                                     "model set sidelined (NaN: none scored)", labels=["models"])
        sideline.add_metric(["production"], _share(tally.sidelined_production, tally.scored))
        sideline.add_metric(["candidate"], _share(tally.sidelined_candidate, tally.scored))
        yield sideline
        disagree = GaugeMetricFamily("cv_shadow_disagreements", "Scored items the candidate "
                                     "decided otherwise, by direction (this candidate)",
                                     labels=["direction"])
        for direction, n in tally.disagreements().items():
            disagree.add_metric([direction], n)
        yield disagree
