"""The node's Prometheus metrics.

Latencies are histograms observed as they happen; everything that a stage
already counts (frames, drops, verdicts, outbox depth...) is read from the
stage at scrape time through a `NodeSnapshot`, so there is one source of
truth per number. Each node has its own registry: no global state.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.35, 0.5, 0.75, 1.0, 2.0, 5.0)


@dataclass(slots=True)
class CameraSnapshot:
    frames: int = 0
    dropped: int = 0
    timeouts: int = 0
    reconnects: int = 0
    skewed: int = 0
    buffers_allocated: int = 0
    fps: float = 0.0
    #: the node needs it (`cameras[].required`) and it is not streaming
    required_missing: bool = False


class RecentRate:
    """Events per second over about the last `window_s`, from a running count sampled
    whenever it is read (scrapes, the status line): a lifetime average would hide a camera
    that stopped an hour ago behind hours of frames."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def rate(self, count: int, now_s: float, since_s: float | None = None) -> float:
        """The rate up to `now_s`; `since_s` (when counting began) is the reference until
        a sample older than the window exists."""
        with self._lock:
            samples = self._samples
            samples.append((now_s, count))
            while len(samples) > 2 and samples[1][0] <= now_s - self.window_s:
                samples.popleft()  # keep one sample at or beyond the window's start
            t0, c0 = samples[0]
            if now_s - t0 < self.window_s and since_s is not None:
                t0, c0 = since_s, 0
            return (count - c0) / max(1e-3, now_s - t0)


@dataclass(slots=True)
class NodeSnapshot:
    """Numbers the stages keep, read at scrape time."""

    cameras: Mapping[str, CameraSnapshot] = field(default_factory=dict)
    node_id: str = ""
    line_id: str = ""
    version: str = ""
    queue_depth: Mapping[str, int] = field(default_factory=dict)
    queue_drops: Mapping[str, int] = field(default_factory=dict)
    stage_steps: Mapping[str, int] = field(default_factory=dict)
    stage_errors: Mapping[str, int] = field(default_factory=dict)
    stage_stalled_s: Mapping[str, float] = field(default_factory=dict)
    stage_failing_s: Mapping[str, float] = field(default_factory=dict)
    items: Mapping[str, int] = field(default_factory=dict)  # admitted, passed, sidelined, ...
    verdicts_by_decision: Mapping[str, int] = field(default_factory=dict)
    verdicts_by_reason: Mapping[str, int] = field(default_factory=dict)
    deadline_misses: int = 0
    late_verdicts: int = 0
    outbox_depth: int = 0
    broker_connected: bool = False
    rejected_inputs: Mapping[str, int] = field(default_factory=dict)
    calibration_ok: Mapping[str, bool] = field(default_factory=dict)
    model_versions: Mapping[str, str] = field(default_factory=dict)
    unmatched_frames: int = 0
    late_frames: int = 0
    #: MQTT verdict delivery: published, acked, resent, refused, dropped_expired,
    #: dropped_actionable, unpersisted, acks_not_recorded, reconnects, connect_failures
    mqtt: Mapping[str, int] = field(default_factory=dict)
    #: item-finding worker processes: workers, jobs, respawns, jobs_done_here; cpu_s
    item_workers: Mapping[str, float] = field(default_factory=dict)


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Callable[[], NodeSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        yield from _camera_families(s)
        yield from _stage_families(s)
        yield from _item_families(s)


def _camera_families(s: NodeSnapshot) -> Iterator[Metric]:
    specs = (("frames", "cv_camera_frames", "Frames received"),
             ("dropped", "cv_camera_frames_dropped", "Frames dropped (camera or queue)"),
             ("timeouts", "cv_camera_timeouts", "Frame-wait timeouts"),
             ("reconnects", "cv_camera_reconnects", "Camera re-opens after loss"),
             ("skewed", "cv_camera_skewed_frames", "Frames with colour/depth skew over tolerance"),
             ("buffers_allocated", "cv_camera_frame_buffers_allocated",
              "Frame buffers allocated; flat once warm (they are reused)"))
    for attr, name, doc in specs:
        fam = CounterMetricFamily(name, doc, labels=["camera"])
        for cam, snap in s.cameras.items():
            fam.add_metric([cam], getattr(snap, attr))
        yield fam
    fps = GaugeMetricFamily("cv_camera_fps", "Frames per second, recent", labels=["camera"])
    for cam, snap in s.cameras.items():
        fps.add_metric([cam], snap.fps)
    yield fps
    missing = GaugeMetricFamily(
        "cv_camera_required_missing", "A required camera is not streaming (1): the node is "
        "degraded", labels=["camera"])
    for cam, snap in s.cameras.items():
        missing.add_metric([cam], 1.0 if snap.required_missing else 0.0)
    yield missing
    unmatched = CounterMetricFamily(
        "cv_sync_unmatched_frames", "Frames that went out without a partner from every camera")
    unmatched.add_metric([], s.unmatched_frames)
    yield unmatched
    late = CounterMetricFamily(
        "cv_sync_late_frames", "Frames that came after their moment had gone out (dropped; "
        "not in cv_sync_unmatched_frames)")
    late.add_metric([], s.late_frames)
    yield late
    cal = GaugeMetricFamily("cv_calibration_ok", "Belt calibration check passed (1) or not (0)",
                            labels=["camera"])
    for cam, ok in s.calibration_ok.items():
        cal.add_metric([cam], 1.0 if ok else 0.0)
    yield cal


def _stage_families(s: NodeSnapshot) -> Iterator[Metric]:
    depth = GaugeMetricFamily("cv_queue_depth", "Items waiting in a stage queue", labels=["queue"])
    for q, d in s.queue_depth.items():
        depth.add_metric([q], d)
    yield depth
    drops = CounterMetricFamily("cv_queue_drops", "Values a full queue refused", labels=["queue"])
    for q, d in s.queue_drops.items():
        drops.add_metric([q], d)
    yield drops
    if s.item_workers:
        w = s.item_workers
        for name, doc, value, kind in (
                ("cv_item_workers", "Item-finding worker processes", w["workers"], "gauge"),
                ("cv_item_worker_jobs", "Camera frames searched by the workers", w["jobs"],
                 "counter"),
                ("cv_item_worker_respawns", "Workers that died and were replaced",
                 w["respawns"], "counter"),
                ("cv_item_worker_jobs_done_here", "Frames a dead worker left, searched in the "
                 "item thread", w["jobs_done_here"], "counter"),
                ("cv_item_worker_cpu_seconds", "CPU time of the workers", w["cpu_s"],
                 "counter"),
                ("cv_item_worker_depth_shared", "Depth images the workers read where the "
                 "camera wrote them (shared memory)", w["frames_shared"], "counter"),
                ("cv_item_worker_depth_copied", "Depth images copied to the workers (no free "
                 "frame slot, or a source without them)", w["frames_copied"], "counter")):
            fam: Metric = (GaugeMetricFamily(name, doc, value=value) if kind == "gauge"
                           else CounterMetricFamily(name, doc, value=value))
            yield fam
    steps = CounterMetricFamily("cv_stage_steps", "Units of work done", labels=["stage"])
    errors = CounterMetricFamily("cv_stage_errors", "Steps that raised", labels=["stage"])
    stalled = GaugeMetricFamily("cv_stage_seconds_since_progress", "Seconds since progress",
                                labels=["stage"])
    failing = GaugeMetricFamily("cv_stage_failing_seconds", "Seconds for which every step "
                                "with work has raised (0: not failing)", labels=["stage"])
    for stage, n in s.stage_steps.items():
        steps.add_metric([stage], n)
        errors.add_metric([stage], s.stage_errors.get(stage, 0))
        stalled.add_metric([stage], s.stage_stalled_s.get(stage, 0.0))
        failing.add_metric([stage], s.stage_failing_s.get(stage, 0.0))
    yield steps
    yield errors
    yield stalled
    yield failing


def _item_families(s: NodeSnapshot) -> Iterator[Metric]:
    items = GaugeMetricFamily(
        "cv_items", "Item accounting: admitted = passed + sidelined + fail_safe + in_flight",
        labels=["state"])
    for state, n in s.items.items():
        items.add_metric([state], n)
    yield items
    verdicts = CounterMetricFamily("cv_verdicts", "Actuation verdicts published by decision",
                                   labels=["decision"])
    for decision, n in s.verdicts_by_decision.items():
        verdicts.add_metric([decision], n)
    yield verdicts
    reasons = CounterMetricFamily("cv_verdict_reasons", "Reason codes on published verdicts",
                                  labels=["reason"])
    for reason, n in s.verdicts_by_reason.items():
        reasons.add_metric([reason], n)
    yield reasons
    misses = CounterMetricFamily("cv_deadline_misses", "Verdicts published after the divert")
    misses.add_metric([], s.deadline_misses)
    yield misses
    late = CounterMetricFamily("cv_late_verdicts", "Real verdicts after a fail-safe (audit only)")
    late.add_metric([], s.late_verdicts)
    yield late
    outbox = GaugeMetricFamily("cv_outbox_depth", "Verdicts not yet acknowledged by the broker")
    outbox.add_metric([], s.outbox_depth)
    yield outbox
    conn = GaugeMetricFamily("cv_broker_connected", "MQTT connection up (1) or down (0)")
    conn.add_metric([], 1.0 if s.broker_connected else 0.0)
    yield conn
    if s.mqtt:
        yield from _mqtt_families(s.mqtt)
    rejected = CounterMetricFamily("cv_rejected_inputs", "Bad input messages", labels=["reason"])
    for reason, n in s.rejected_inputs.items():
        rejected.add_metric([reason], n)
    yield rejected
    models = GaugeMetricFamily("cv_model_info", "Loaded model versions",
                               labels=["model", "version"])
    for model, version in s.model_versions.items():
        models.add_metric([model, version], 1.0)
    yield models
    if s.node_id:  # joins a scrape target to its line in site dashboards
        info = GaugeMetricFamily("cv_node_info", "This node: its ID, line and release",
                                 labels=["node_id", "line_id", "version"])
        info.add_metric([s.node_id, s.line_id, s.version], 1.0)
        yield info


#: What happened to verdicts on their way to the broker (`cv_mqtt_verdicts{outcome}`).
_MQTT_OUTCOMES = ("published", "acked", "resent", "refused", "dropped_expired",
                  "dropped_actionable", "unpersisted", "acks_not_recorded")


def _mqtt_families(m: Mapping[str, int]) -> Iterator[Metric]:
    verdicts = CounterMetricFamily(
        "cv_mqtt_verdicts", "Verdicts by delivery outcome: published = acked + refused + "
        "dropped_* + outbox depth; resent and acks_not_recorded count events, not verdicts",
        labels=["outcome"])
    for outcome in _MQTT_OUTCOMES:
        verdicts.add_metric([outcome], m.get(outcome, 0))
    yield verdicts
    yield CounterMetricFamily("cv_mqtt_reconnects", "Connections to the broker after a loss",
                              value=m.get("reconnects", 0))
    yield CounterMetricFamily("cv_mqtt_failovers", "Moves to the next broker of mqtt.url's "
                              "failover list", value=m.get("failovers", 0))
    yield CounterMetricFamily("cv_mqtt_connect_failures", "Connection attempts that failed",
                              value=m.get("connect_failures", 0))


class NodeMetrics:
    """One node's metrics registry."""

    def __init__(self, snapshot: Callable[[], NodeSnapshot]) -> None:
        self._snapshot = snapshot
        self.registry = CollectorRegistry(auto_describe=True)
        self.stage_latency = Histogram(
            "cv_stage_latency_seconds", "Time a stage spends on one unit of work",
            labelnames=["stage"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.capture_to_ack = Histogram(
            "cv_capture_to_ack_seconds", "Frame capture to broker PUBACK of the verdict",
            buckets=_E2E_BUCKETS, registry=self.registry)
        self.capture_to_decision = Histogram(
            "cv_capture_to_decision_seconds", "Frame capture to verdict decided",
            buckets=_E2E_BUCKETS, registry=self.registry)
        self._stage_children: dict[str, Histogram] = {}

    def register(self) -> None:
        """Export the snapshot's metrics too; registering reads `snapshot()` once, so call it
        when everything the snapshot reads exists."""
        self.registry.register(_SnapshotCollector(self._snapshot))

    def observe_stage(self, stage: str, seconds: float) -> None:
        # Called for every unit of work of every stage: look the labelled child up once.
        child = self._stage_children.get(stage)
        if child is None:
            child = self._stage_children[stage] = self.stage_latency.labels(stage=stage)
        child.observe(seconds)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)
