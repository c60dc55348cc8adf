"""The node: wiring only. Stages, queues, start, stop, reload, health.

    capture (1 thread per camera) -> frames queue -> sync -> framesets queue
    -> items (find, track, tie to announcements, crop) -> items queue
    -> inference (batched; fusion + decision) -> deadline scheduler -> outbox -> MQTT

Announcements and feedback arrive on the MQTT client's thread and go to their
collaborators (`routing.Admission`, `feedback.FeedbackLearner`); each decided item goes
from the inference stage through `routing.Completion` to the scheduler (and, judged by the
models, to the shadow scorer, `shadow.ShadowScorer`, when a candidate is configured). The
node only builds and connects them, starts and stops them, and reports their health.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import structlog

from edge import __version__
from edge.audit.replay import ModelContext
from edge.audit.store import SnapshotStore
from edge.capture.buffers import HasFrameBuffers
from edge.capture.sync import FrameSynchronizer
from edge.catalogue import Catalogue
from edge.clock import Clock
from edge.config import Config
from edge.heap import HeapTrimmer
from edge.infer.backend import BackendError
from edge.infer.inspector import ItemInspector
from edge.infer.manifest import ManifestError
from edge.infer.reload import ModelRejectedError, prepare_reload, switch_to
from edge.perception.cameras import Cameras
from edge.perception.induct import InductAssociator
from edge.perception.segmentation import ItemSegmenter
from edge.perception.segmentation_workers import SegmentationWorkers
from edge.perception.tracking import ItemTracker
from edge.pipeline.feedback import FeedbackLearner, RecentViews
from edge.pipeline.metrics import CameraSnapshot, NodeMetrics, NodeSnapshot, RecentRate
from edge.pipeline.routing import Admission, Broadcast, Completion, VerdictChannel
from edge.pipeline.shadow import ShadowScorer
from edge.pipeline.stage_thread import BoundedQueue, StageThread
from edge.pipeline.stages import (
    CaptureStage,
    Decided,
    InferenceStage,
    ItemStage,
    ReplayLockstep,
    SyncStage,
)
from edge.publish.mqtt import AckedVerdict, VerdictPublisher
from edge.types import Announcement, Frame, FrameSet, ItemRecord
from edge.verdicts.deadlines import DeadlineScheduler
from edge.verdicts.policy import VerdictPolicy

log = structlog.get_logger(__name__)

#: A stage that makes no progress for this long is stalled (watchdog, health).
STALL_AFTER_S = 10.0


@dataclass(frozen=True, slots=True)
class NodeHooks:
    """Optional observers (demo, snapshots, tests); called on the stage's thread."""

    on_decided: Callable[[Decided], None] | None = None
    on_acked: Callable[[AckedVerdict], None] | None = None
    on_frameset: Callable[[FrameSet], None] | None = None


class Node:
    """One inspection node on one conveyor line."""

    publisher: VerdictPublisher
    admission: Admission

    def __init__(self, cfg: Config, clock: Clock, cameras: Cameras, inspector: ItemInspector,
                 catalogue: Catalogue, *, outbox_path: Path, hooks: NodeHooks | None = None,
                 stall_after_s: float = STALL_AFTER_S,
                 snapshots: SnapshotStore | None = None,
                 channels: Sequence[VerdictChannel] = (),
                 shadow: ShadowScorer | None = None) -> None:
        # The stages and the item-finding processes are the parallelism: OpenCV's own thread
        # pool on top of them oversubscribes the cores (BENCHMARKS.md).
        cv2.setNumThreads(1)
        self.cfg = cfg
        self.clock = clock
        self.cameras = cameras
        self.inspector = inspector
        self.catalogue = catalogue
        self.hooks = hooks or NodeHooks()
        self.stall_after_s = stall_after_s
        self.stop_event = threading.Event()
        policy = VerdictPolicy.from_manifest(inspector.manifest, cfg.decision)
        self.recent = RecentViews()
        self.snapshots = snapshots  # audit snapshots (started and closed by the owner)
        self._build_publisher(outbox_path)
        #: other ways verdicts reach the controller side (OPC UA, Sparkplug B)
        self.channels = tuple(channels)
        self.scheduler = DeadlineScheduler(
            Broadcast(self.publisher, self.channels), cfg.decision, clock,
            cfg.belt.safety_margin_ms,
            threshold_version=policy.thresholds.version,
            model_versions=inspector.model_versions())
        self.frames_q: BoundedQueue[Frame] = BoundedQueue("frames", 4 * len(cameras.sources))
        self.framesets_q: BoundedQueue[FrameSet] = BoundedQueue("framesets", 4)
        self.items_q: BoundedQueue[ItemRecord] = BoundedQueue("items", 4 * cfg.models.max_batch)
        self._build_capture()
        self.associator = InductAssociator(cfg.belt, cfg.items, on_seen=self.scheduler.mark_seen,
                                           id_prefix=f"{cfg.node.node_id}-unannounced")
        self.admission = Admission(self.scheduler, self.associator)
        segmenters = {cid: ItemSegmenter(cid, plane.intrinsics, plane.pose, cfg.items)
                      for cid, plane in cameras.planes.items()}
        self.tracker = ItemTracker(segmenters, self.associator, cfg.items)
        self.item_stage = ItemStage(self.tracker, self.framesets_q, self.items_q, self.stop_event,
                                    on_frameset=self.hooks.on_frameset)
        self.metrics = NodeMetrics(self.snapshot)
        self.shadow = shadow  # the candidate models in shadow (stopped and closed with the node)
        # What judged each item, for its snapshot (replay) and a shadow disagreement's.
        context = (ModelContext(inspector, cfg.decision)
                   if snapshots is not None or shadow is not None else None)
        complete = Completion(self.scheduler, self.recent, snapshots,
                              self.metrics.capture_to_decision.observe, self.hooks.on_decided,
                              None if shadow is None else shadow.offer, context)
        self.inference = InferenceStage(self.inspector.infer, policy, complete, self.items_q,
                                        clock, cfg.models.max_batch)
        if shadow is not None:
            shadow.attach(lambda payload: self.publisher.publish_message(
                self.publisher.topics.shadow, payload), queued=self.items_q.depth,
                deciding=self.inference.batch_lock.locked)
        self._threads: list[StageThread] = []
        self._stopped = False
        #: belt calibration check per camera (set by the service's periodic check)
        self.calibration_ok: dict[str, bool] = {}
        self.started_mono: float | None = None
        self._camera_rates = {cid: RecentRate(10.0) for cid in cameras.sources}
        self.heap_trimmer: HeapTrimmer | None = None
        if cfg.node.heap_trim_interval_s is not None:
            self.heap_trimmer = HeapTrimmer(cfg.node.heap_trim_interval_s)
        self._register_metrics()

    def _build_publisher(self, outbox_path: Path) -> None:
        """The MQTT side, both ways: the publisher's inputs reach collaborators that need the
        publisher (the admission is built once the associator exists); the publisher calls
        nothing before `start()`."""

        def publish_event(kind: str, body: Mapping[str, object]) -> None:
            self.publisher.publish_event(kind, body)

        def admit(announcement: Announcement) -> None:
            self.admission(announcement)

        def damage_threshold() -> float:  # the thresholds in use (a reload replaces them)
            return self.policy.thresholds.components.get("damage", 0.5)

        def geometry_threshold() -> float | None:
            # Only models that measure the top face: a dent is what new artwork cannot
            # explain; older models' box deficits alone never held feedback.
            if self.inspector.surface_full_mm is None:
                return None
            return self.policy.thresholds.components.get("geometry")

        self.feedback = FeedbackLearner(
            self.inspector, self.recent, self.snapshots, publish_event,
            damage_threshold=damage_threshold, geometry_threshold=geometry_threshold,
            learn_per_hour=self.cfg.models.gallery_learn_per_hour)
        self.publisher = VerdictPublisher(
            self.cfg.mqtt, self.cfg.node, outbox_path, self.clock, admit,
            self.feedback.on_feedback, self._on_acked, known_products=self.catalogue.ids(),
            versions={"node": __version__, **self.inspector.model_versions()},
            outbox_max_rows=self.cfg.storage.outbox_max_rows)

    def _register_metrics(self) -> None:
        """Last: registering the collector reads `snapshot()` (auto_describe), which needs
        every stage."""
        self.metrics.register()
        if self.snapshots is not None:
            self.snapshots.register_metrics(self.metrics.registry)
        if self.heap_trimmer is not None:
            self.heap_trimmer.register_metrics(self.metrics.registry)
        if self.shadow is not None:
            self.shadow.register_metrics(self.metrics.registry)

    def _build_capture(self) -> None:
        """A capture stage per camera, and the sync stage that groups their frames."""
        cfg, sources = self.cfg, self.cameras.sources
        offline = {c.id for c in cfg.cameras if not c.realtime}
        replayed = {c.id: float(c.fps) for c in cfg.cameras if c.id in offline and c.id in sources}
        self.replay_lockstep = ReplayLockstep(replayed) if len(replayed) > 1 else None
        self.captures = {cid: CaptureStage(src, self.frames_q, self.stop_event,
                                           offline=cid in offline,
                                           lockstep=self.replay_lockstep if cid in offline
                                           else None)
                         for cid, src in sources.items()}
        all_offline = offline == set(sources)
        self.synchronizer = FrameSynchronizer(
            list(sources), fps=max(c.fps for c in cfg.cameras),
            tolerance_ms=cfg.sync.tolerance_ms,
            # Recordings read as fast as possible: a reader behind is not a dead camera.
            camera_timeout_ms=float("inf") if all_offline else cfg.sync.camera_timeout_ms)
        self.sync_stage = SyncStage(self.synchronizer, self.frames_q, self.framesets_q,
                                    self.clock, self.stop_event, lossless=all_offline,
                                    finished={cid: c.finished for cid, c in self.captures.items()})

    @property
    def policy(self) -> VerdictPolicy:
        """The verdict policy in use (replaced by a reload)."""
        policy = self.inference.policy
        assert isinstance(policy, VerdictPolicy)
        return policy

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Connect, open the cameras and start every stage."""
        if self.cfg.items.workers > 0 and self.item_stage.workers is None:
            self.item_stage.workers = SegmentationWorkers(
                self.tracker.segmenters, self.cfg.items, self.cfg.items.workers)
        if self.item_stage.workers is not None:
            self._capture_depth_into(self.item_stage.workers)
        self.publisher.start()
        for channel in self.channels:
            channel.start()
        self.scheduler.start()
        steps: dict[str, Callable[[], float | bool]] = {
            f"capture-{cid}": st.step for cid, st in self.captures.items()}
        steps.update(sync=self.sync_stage.step, items=self.item_stage.step,
                     inference=self.inference.step)
        self._threads = [StageThread(name, step, self.stop_event, self.metrics.observe_stage,
                                     failing_window_s=self.stall_after_s)
                         for name, step in steps.items()]
        for src in self.cameras.sources.values():
            src.start()
        for t in self._threads:
            t.start()
        if self.heap_trimmer is not None:
            self.heap_trimmer.start()
        if self.shadow is not None:
            self.shadow.start()
        self.started_mono = time.monotonic()
        log.info("node_started", cameras=list(self.cameras.sources), version=__version__,
                 models=self.inspector.model_versions())

    def _capture_depth_into(self, workers: SegmentationWorkers) -> None:
        """Cameras write depth straight into the workers' shared memory (no copy per frame
        on the way to item finding); a source that cannot copies as before."""
        for cid, src in self.cameras.sources.items():
            pool = workers.depth_pool(cid)
            if pool is not None and isinstance(src, HasFrameBuffers):
                src.frame_buffers.provide(pool)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop capture, finish or fail-safe every item in flight, flush, go offline. Once:
        later calls do nothing."""
        if self._stopped:
            return
        self._stopped = True
        log.info("node_stopping")
        for src in self.cameras.sources.values():
            src.stop()
        self.stop_event.set()
        stuck = {t.name for t in self._threads if not t.join(timeout_s / 4)}
        try:
            self._finish_in_flight(time.monotonic() + timeout_s / 2, stuck)
        except Exception:  # the drain below still gives every item in flight its verdict
            log.exception("finish_in_flight_failed")
            if "items" not in stuck:
                self.item_stage.close()
        drained = self.scheduler.drain()
        self.scheduler.stop()
        if self.shadow is not None:  # before the owner closes the snapshot store
            self.shadow.stop(timeout_s / 4)
        self.feedback.close()  # feedback already taken in is learned
        left = self.publisher.stop(flush_timeout_s=timeout_s / 2)
        for channel in self.channels:
            channel.stop(timeout_s / 4)
        if self.heap_trimmer is not None:
            self.heap_trimmer.stop()
        log.info("node_stopped", fail_safe_on_shutdown=drained, outbox_left=left)

    def _finish_in_flight(self, deadline_mono: float, stuck: set[str]) -> None:
        """Inspect what is already queued or tracked, while time allows. A stage still stuck
        in a call is left alone (its state is in use): the drain fail-safes its items."""
        if "sync" not in stuck:
            for frameset in self.sync_stage.flush():
                self.framesets_q.put_nowait_or_drop(frameset)
        queued: list[FrameSet] = []
        while (fs := self.framesets_q.get_nowait()) is not None:
            queued.append(fs)
        records = self.item_stage.finish(queued) if "items" not in stuck else []
        if "items" not in stuck:  # else its thread may be inside the pool: the workers
            self.item_stage.close()  # leave with the process, the next start removes the ring
        if "inference" not in stuck:  # what is left over is fail-safed by the scheduler's drain
            self.inference.finish(records, deadline_mono)

    def reload(self) -> bool:
        """SIGHUP: the gallery from disk, then new models and thresholds, without dropping
        items. Models that fail to load or miss their golden scores are refused and the
        running ones stay (said in the log and on `…/events`): a bad update must not stop
        the line. Then the shadow candidate, likewise. Returns whether the models and
        thresholds were switched."""
        switched = self._reload_models()
        refused = None if self.shadow is None else self.shadow.reload()
        if refused is not None:
            candidate = None if self.shadow is None else self.shadow.candidate
            self.publisher.publish_event("shadow_reload_refused", {
                "error": refused[:300],
                "kept_candidate": None if candidate is None else candidate.describe()})
        return switched

    def _reload_models(self) -> bool:
        gallery = self.inspector.gallery.reload()
        try:  # opened and tested beside the running models, which go on inspecting
            prepared = prepare_reload(self.inspector)
        except (ModelRejectedError, ManifestError, BackendError, OSError) as exc:
            log.error("reload_refused", error=str(exc), gallery=gallery,
                      threshold_version=self.policy.thresholds.version)
            self.publisher.publish_event("reload_refused", {
                "error": str(exc)[:300], "kept_models": self.inspector.model_versions(),
                "kept_thresholds": self.policy.thresholds.version, "gallery": gallery})
            return False
        policy = VerdictPolicy.from_manifest(prepared.manifest, self.cfg.decision)
        # Between batches: no batch is inferred with one model set and decided with another's
        # thresholds. Only the switch itself waits for the batch in progress.
        with self.inference.batch_lock:
            report = switch_to(self.inspector, prepared)
            self.inference.policy = policy
            versions = self.inspector.model_versions()
            self.scheduler.set_versions(policy.thresholds.version, versions)
            self.publisher.set_versions(versions)
        self.inspector.persist_gallery()  # re-embedded banks: written once nothing waits
        log.info("node_reloaded", threshold_version=policy.thresholds.version,
                 golden=report.passed, gallery=gallery)
        return True

    # --- callbacks --------------------------------------------------------------------------

    def _on_acked(self, acked: AckedVerdict) -> None:
        if acked.captured_ms is not None:
            self.metrics.capture_to_ack.observe(max(0.0, acked.acked_ms - acked.captured_ms)
                                                / 1000.0)
        if self.hooks.on_acked is not None:
            self.hooks.on_acked(acked)

    # --- health -----------------------------------------------------------------------------

    def stalled_stages(self) -> list[str]:
        """Stages that died, made no progress for `stall_after_s`, or whose every step with
        work raised for that long (`failing_stages`): the watchdog stops being pinged and the
        update's health gate fails."""
        failing = set(self.failing_stages())
        return [t.name for t in self._threads
                if not t.alive or t.stalled_for_s() > self.stall_after_s or t.name in failing]

    def failing_stages(self) -> list[str]:
        """Stages whose every step with work has raised for longer than `stall_after_s`."""
        return [t.name for t in self._threads
                if t.stats.failing_for_s(self.stall_after_s) > self.stall_after_s]

    def camera_states(self) -> dict[str, str]:
        """Per camera: "streaming", "waiting" (no frame yet) or "failed: why" (gave up)."""
        return {cid: ("failed: " + c.failed) if c.failed else
                ("streaming" if c.last_frame_ms is not None else "waiting")
                for cid, c in self.captures.items()}

    def degraded(self) -> list[str]:
        """What the node runs without that it should have: required cameras not streaming
        (`cameras[].required`), a shadow scorer whose thread ended (production goes on).
        Empty: nothing."""
        out = [f"camera {cid} {state}" for cid, state in self._required_missing().items()]
        if self.shadow is not None and self.shadow.dead:
            out.append("shadow scorer not running")
        return out

    def _required_missing(self) -> dict[str, str]:
        required = {c.id for c in self.cfg.cameras if c.required}
        return {cid: state for cid, state in self.camera_states().items()
                if cid in required and state != "streaming"}

    def health(self) -> dict[str, object]:
        stats = self.scheduler.stats()
        return {
            "stalled_stages": self.stalled_stages(),
            "failing_stages": self.failing_stages(),
            "degraded": self.degraded(),
            "cameras": self.camera_states(),
            "broker_connected": self.publisher.connected,
            "outbox_depth": self.publisher.outbox_depth,
            "in_flight": stats.in_flight,
            "deadline_misses": stats.deadline_misses,
            "verdicts_1h": stats.verdicts_1h,
            "sideline_rate_1h": stats.sideline_rate_1h,
            "fail_safe_rate_1h": stats.fail_safe_rate_1h,
            "last_verdict_ms": stats.last_verdict_ms,
        }

    def summary_line(self) -> str:
        s = self.scheduler.stats()
        stalled = self.stalled_stages()
        return (f"items={s.admitted} pass={s.passed} sideline={s.sidelined} "
                f"failsafe={s.fail_safe} inflight={s.in_flight} misses={s.deadline_misses} "
                f"outbox={self.publisher.outbox_depth} "
                f"broker={'up' if self.publisher.connected else 'down'}"
                + (f" STALLED={','.join(stalled)}" if stalled else "")
                + (" DEGRADED" if self.degraded() else ""))

    def snapshot(self) -> NodeSnapshot:
        missing = self._required_missing()
        cams = {cid: CameraSnapshot(
            frames=c.source.counters.frames_received,
            dropped=c.source.counters.frames_dropped,
            timeouts=c.source.counters.timeouts,
            reconnects=c.source.counters.reconnects,
            skewed=c.source.counters.skewed_frames,
            buffers_allocated=c.source.counters.buffers_allocated,
            fps=self._camera_fps(cid, c.source.counters.frames_received),
            required_missing=cid in missing)
            for cid, c in self.captures.items()}
        s = self.scheduler.stats()
        pub = self.publisher.metrics()
        return NodeSnapshot(
            cameras=cams, node_id=self.cfg.node.node_id, line_id=self.cfg.node.line_id,
            version=__version__,
            queue_depth={q.name: q.depth() for q in self._queues()},
            queue_drops={q.name: q.dropped for q in self._queues()},
            stage_steps={t.name: t.stats.steps for t in self._threads},
            stage_errors={t.name: t.stats.errors for t in self._threads},
            stage_stalled_s={t.name: t.stalled_for_s() for t in self._threads},
            stage_failing_s={t.name: t.stats.failing_for_s(self.stall_after_s)
                             for t in self._threads},
            items={"admitted": s.admitted, "passed": s.passed, "sidelined": s.sidelined,
                   "fail_safe": s.fail_safe, "in_flight": s.in_flight},
            verdicts_by_decision=dict(s.by_decision),
            verdicts_by_reason=dict(s.by_reason),
            deadline_misses=s.deadline_misses,
            late_verdicts=s.late,
            outbox_depth=self.publisher.outbox_depth,
            broker_connected=self.publisher.connected,
            rejected_inputs=dict(pub.rejected),
            model_versions=self.inspector.model_versions(),
            calibration_ok=dict(self.calibration_ok),
            unmatched_frames=self.synchronizer.counters.unmatched_frames,
            late_frames=self.synchronizer.counters.late_frames,
            mqtt={"published": pub.published, "acked": pub.acked, "resent": pub.resent,
                  "refused": pub.refused, "dropped_expired": pub.dropped_expired,
                  "dropped_actionable": pub.dropped_actionable,
                  "unpersisted": pub.outbox_unpersisted,
                  "acks_not_recorded": pub.acks_not_recorded, "reconnects": pub.reconnects,
                  "failovers": pub.failovers,
                  "connect_failures": pub.connect_failures},
            item_workers=self._item_worker_counters(),
        )

    def _camera_fps(self, camera_id: str, frames: int) -> float:
        if self.started_mono is None:
            return 0.0
        return self._camera_rates[camera_id].rate(frames, time.monotonic(),
                                                  since_s=self.started_mono)

    def _item_worker_counters(self) -> dict[str, float]:
        workers = self.item_stage.workers
        if workers is None:
            return {}
        return {**workers.counters(), "cpu_s": workers.cpu_s()}

    def _queues(self) -> tuple[BoundedQueue[Frame] | BoundedQueue[FrameSet]
                               | BoundedQueue[ItemRecord], ...]:
        return (self.frames_q, self.framesets_q, self.items_q)


def stage_timings(node: Node) -> Mapping[str, float]:
    """Median step time (ms) per stage, recent window."""
    out = {}
    for t in node._threads:
        recent = sorted(t.stats.recent_ms)
        out[t.name] = recent[len(recent) // 2] if recent else 0.0
    return out
