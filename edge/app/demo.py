"""`edge-node demo`: the whole node on embedded defaults, with a live view and a summary.

Synthetic cameras with ground truth, ONNX Runtime on the CPU, the shipped
models, and a private mosquitto on a free loopback port (unless --broker
names one). A simulated sortation controller announces every item over MQTT
and collects the verdicts; the summary compares them with the ground truth.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import structlog

from edge.app.build import build_node
from edge.audit.store import SnapshotStore
from edge.clock import WallClock
from edge.config import Config, ConfigError, HttpConfig
from edge.pipeline.node import Node, NodeHooks, stage_timings
from edge.pipeline.stages import Decided
from edge.publish.broker import MosquittoBroker
from edge.publish.mqtt import AckedVerdict
from edge.publish.topics import Topics
from edge.sim.controller import ControllerSimulator
from edge.sim.conveyor import SyntheticConveyor
from edge.web.live import LiveFeed
from edge.web.server import HttpServer, start_http

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class DemoOptions:
    seconds: float = 30.0
    items_per_second: float | None = None
    seed: int = 0
    broker: str | None = None
    summary_json: Path | None = None
    damage_rate: float | None = None
    quiet: bool = False
    http_port: int | None = None  # serve /metrics and the live page on 127.0.0.1 (0: any port)
    snapshots_dir: Path | None = None  # keep the audit snapshots here (default: temporary)
    opcua_port: int | None = None  # serve OPC UA on 127.0.0.1:PORT, no security, anonymous


@dataclass(slots=True)
class DemoRecorder:
    """What the demo observes inside the node (latencies, decisions with truth)."""

    ack_latency_ms: list[float] = field(default_factory=list)
    seen_items: set[str] = field(default_factory=set)  # announced items the node decided on
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_acked(self, acked: AckedVerdict) -> None:
        if acked.captured_ms is not None:
            with self.lock:
                self.ack_latency_ms.append(acked.acked_ms - acked.captured_ms)

    def on_decided(self, decided: Decided) -> None:
        with self.lock:
            if not decided.record.unannounced:
                self.seen_items.add(decided.record.item_id)


def demo_config(base: Config, opts: DemoOptions, broker_url: str, state_dir: Path) -> Config:
    syn = base.synthetic
    if opts.items_per_second is not None:
        syn = dataclasses.replace(syn, items_per_second=opts.items_per_second)
    if opts.damage_rate is not None:
        syn = dataclasses.replace(syn, damage_rate=opts.damage_rate)
    syn = dataclasses.replace(syn, seed=opts.seed)
    return dataclasses.replace(
        base, synthetic=syn,
        mqtt=dataclasses.replace(base.mqtt, url=broker_url),
        # Every result shown as it comes: a client that only watches (UaExpert) acknowledges
        # nothing, and the handshake would count each result missed.
        opcua=base.opcua if opts.opcua_port is None else dataclasses.replace(
            base.opcua, enabled=True, bind="127.0.0.1", port=opts.opcua_port,
            security=("none",), allow_anonymous=True, handshake=False),
        storage=dataclasses.replace(base.storage, state_dir=state_dir),
        models=dataclasses.replace(base.models, gallery_dir=state_dir / "gallery",
                                   engine_cache=state_dir / "engines"))


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _strings(value: object) -> list[str]:
    """A payload's list of strings (reasons), as strings; anything else: empty."""
    return [str(v) for v in value] if isinstance(value, list) else []


def memory_mb(node: Node) -> dict[str, float]:
    """Peak resident memory of this process and of the item-finding workers: the plain sum of
    peak RSS counts the shared libraries twice; the node's peak RSS plus the workers' private
    memory is what the device spends."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    workers = node.item_stage.workers
    peak = workers.peak_rss_mb() if workers is not None else 0.0
    private = workers.private_mb() if workers is not None else 0.0
    return {"node_peak_rss": round(own, 1), "item_workers_peak_rss": round(peak, 1),
            "item_workers_private": round(private, 1),
            "sum_of_peak_rss": round(own + peak, 1),
            "node_peak_rss_plus_workers_private": round(own + private, 1)}


def summarize(node: Node, controller: ControllerSimulator, world: SyntheticConveyor,
              recorder: DemoRecorder, cfg: Config) -> dict[str, object]:
    """The demo's summary JSON (keys documented in README.md)."""
    actuations = controller.actuations()
    last = max((a.induct_time_ms for a in controller.announced.values()), default=world.start_ms)
    truth = {it.item_id: it for it in world.schedule.items_until(last - world.start_ms)
             if it.item_id in controller.announced}
    decisions: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for v in actuations.values():
        decisions[str(v["decision"])] = decisions.get(str(v["decision"]), 0) + 1
        for r in _strings(v.get("reasons")):
            reasons[r] = reasons.get(r, 0) + 1
    damaged = [i for i, it in truth.items() if it.damage is not None]
    intact = [i for i, it in truth.items() if it.damage is None]
    caught = sum(1 for i in damaged if actuations.get(i, {}).get("decision") == "sideline")
    false_alarms = sum(1 for i in intact if actuations.get(i, {}).get("decision") == "sideline")
    stats = node.scheduler.stats()
    seen = len(recorder.seen_items)
    return {
        "items_announced": len(controller.announced),
        "items_seen": seen,
        "unannounced_items": stats.unannounced,
        # The node's own delivery accounting, and what the reference consumer received:
        # equal unless the broker lost verdicts it had acknowledged.
        "verdicts_published": node.publisher.metrics().published,
        "verdicts_acked": node.publisher.metrics().acked,
        "verdicts_received_by_controller": controller.verdict_count(),
        "actuation_verdicts": len(actuations),
        "decisions": decisions,
        "reasons": reasons,
        "deadline_misses": stats.deadline_misses,
        "late_verdicts": stats.late,
        "latency_ms": {"p50": _percentile(recorder.ack_latency_ms, 50),
                       "p99": _percentile(recorder.ack_latency_ms, 99),
                       "what": "frame capture to broker PUBACK of the verdict"},
        "detection": {
            "recall": caught / len(damaged) if damaged else None,
            "false_positive_rate": false_alarms / len(intact) if intact else None,
            "damaged_items": len(damaged),
            "sidelined_damaged": caught,
            "sidelined_intact": false_alarms,
        },
        "camera_frames_dropped": {cid: c.source.counters.frames_dropped
                                  for cid, c in node.captures.items()},
        "camera_frame_buffers": {cid: c.source.counters.buffers_allocated
                                 for cid, c in node.captures.items()},
        "item_workers": (node.item_stage.workers.counters()
                         if node.item_stage.workers is not None else {}),
        "stage_ms_median": {k: round(v, 2) for k, v in stage_timings(node).items()},
        "memory_mb": memory_mb(node),
        "node_id": cfg.node.node_id,
        "topic_prefix": Topics(cfg.mqtt.topic_prefix, cfg.node.line_id, cfg.node.node_id).root,
    }


@dataclass(slots=True)
class OperatorView:
    """The demo's audit snapshots and, with an HTTP port, /metrics and the live page."""

    store: SnapshotStore | None
    live: LiveFeed | None
    port: int | None
    http: HttpServer | None = None

    @staticmethod
    def build(cfg: Config, opts: DemoOptions, state: Path) -> OperatorView:
        store = (SnapshotStore(opts.snapshots_dir or state / "snapshots", cfg.storage)
                 if cfg.storage.snapshots else None)
        live = LiveFeed() if opts.http_port is not None else None
        return OperatorView(store, live, opts.http_port)

    def hooks(self, base: NodeHooks) -> NodeHooks:
        return self.live.wrap(base) if self.live is not None else base

    def start(self, node: Node, out: TextIO) -> None:
        if self.store is not None:
            self.store.start()
        if self.port is not None:
            http_cfg = HttpConfig(port=self.port, bind="127.0.0.1", live_page=True)
            self.http = start_http(http_cfg, node, live=self.live)
            print(f"live page: {self.http.url}/   metrics: {self.http.url}/metrics", file=out,
                  flush=True)

    def stop(self) -> None:
        if self.store is not None:
            self.store.close()
        if self.http is not None:
            self.http.shutdown()


class LiveView:
    """A plain terminal view: one line per verdict, a status line per second."""

    def __init__(self, out: TextIO, quiet: bool) -> None:
        self._out = out
        self._quiet = quiet
        self._lock = threading.Lock()

    def verdict(self, payload: dict[str, object]) -> None:
        if self._quiet:
            return
        scores = payload.get("scores") or {}
        fused = scores.get("fused") if isinstance(scores, dict) else None
        mark = "SIDELINE" if payload["decision"] == "sideline" else "pass    "
        late = " LATE" if payload.get("late") else ""
        ts = payload.get("timestamps") or {}
        lat = ""
        if isinstance(ts, dict) and ts.get("captured") and ts.get("published"):
            lat = f" {int(ts['published']) - int(ts['captured']):4d} ms"
        fused_txt = f"{fused:.3f}" if isinstance(fused, float) else "  -  "
        with self._lock:
            print(f"  {payload['item_id']:<20} {payload.get('product_id') or '?':<9} {mark}"
                  f" fused={fused_txt}{lat} {','.join(_strings(payload.get('reasons')))}{late}",
                  file=self._out, flush=True)

    def status(self, node: Node, elapsed_s: float) -> None:
        if self._quiet:
            return
        timings = " ".join(f"{k}={v:.1f}ms" for k, v in stage_timings(node).items())
        with self._lock:
            print(f"[{elapsed_s:5.1f}s] {node.summary_line()}{_opcua_status(node)} | {timings}",
                  file=self._out, flush=True)


def _opcua_status(node: Node) -> str:
    """' opcua_clients=N' when the node serves OPC UA (asyncua imported only then)."""
    if not node.cfg.opcua.enabled:
        return ""
    from edge.publish.opcua.channel import OpcUaChannel
    clients = sum(c.clients for c in node.channels if isinstance(c, OpcUaChannel))
    return f" opcua_clients={clients}"


def _announce_opcua(node: Node, out: TextIO) -> None:
    """Say where OPC UA clients connect, once the server listens (a few seconds)."""
    if not node.cfg.opcua.enabled:
        return
    from edge.publish.opcua.channel import OpcUaChannel
    for channel in (c for c in node.channels if isinstance(c, OpcUaChannel)):
        ok = channel.wait_ready(30.0)
        print(f"OPC UA: {channel.endpoint_url} (no security, anonymous, no handshake; "
              f"namespace {channel.cfg.namespace_uri})" if ok else
              f"OPC UA server failed: {channel.failed}", file=out, flush=True)


def run_demo(base: Config, opts: DemoOptions, out: TextIO = sys.stdout) -> dict[str, object]:
    """Run the demo; returns the summary (also written to --summary-json)."""

    if opts.seconds <= 0:
        raise ConfigError("--seconds", opts.seconds, "a positive number of seconds")
    if opts.opcua_port is not None and not 1 <= opts.opcua_port <= 65535:
        raise ConfigError("--opcua-port", opts.opcua_port, "a TCP port, 1 to 65535")
    with tempfile.TemporaryDirectory(prefix="cv-demo-") as tmp:
        state = Path(tmp)
        broker = None if opts.broker else MosquittoBroker(state / "broker")
        if broker is not None:
            broker.start()
        try:
            url = opts.broker or (broker.url if broker else "")
            cfg = demo_config(base, opts, url, state)
            return _run(cfg, opts, state, out)
        finally:
            if broker is not None:
                broker.close()


def _run(cfg: Config, opts: DemoOptions, state: Path, out: TextIO) -> dict[str, object]:
    clock = WallClock()
    recorder = DemoRecorder()
    view = LiveView(out, opts.quiet)
    operator = OperatorView.build(cfg, opts, state)
    built = build_node(
        cfg, clock, hooks=operator.hooks(NodeHooks(on_decided=recorder.on_decided,
                                                   on_acked=recorder.on_acked)),
        snapshots=operator.store, belt_start_delay_ms=300.0)
    node, world = built.node, built.world
    if world is None:
        raise ConfigError("cameras", None, "the demo needs synthetic cameras")
    topics = Topics(cfg.mqtt.topic_prefix, cfg.node.line_id, cfg.node.node_id)
    controller = ControllerSimulator(cfg.mqtt.urls[0], topics, clock,
                                     world.due_announcements,
                                     on_verdict=view.verdict)
    belt = cfg.belt
    travel_ms = (belt.induct_to_camera_m + belt.camera_to_divert_m) / belt.speed_mps * 1000.0
    # Stop announcing early enough that every announced item reaches the divert in time.
    world.induct_cutoff_ms = max(0.0, opts.seconds * 1000.0 - travel_ms)
    print(f"conveyor-vision demo: {opts.seconds:.0f} s, broker {cfg.mqtt.url}, topics "
          f"{topics.root}/…, {cfg.synthetic.items_per_second} items/s", file=out, flush=True)
    operator.start(node, out)
    # The belt starts moving now, not when the world was built (loading models takes seconds).
    world.start_ms = clock.now_ms() + 300.0
    node.start()
    try:
        if not node.publisher.wait_connected(10.0):
            raise RuntimeError(f"no MQTT connection to {cfg.mqtt.url}")
        _announce_opcua(node, out)
        controller.start()
        # The first items are inducted only once the controller can announce them.
        world.start_ms = max(world.start_ms, clock.now_ms() + 100.0)
        t0 = time.monotonic()
        while (elapsed := time.monotonic() - t0) < opts.seconds:
            time.sleep(min(1.0, opts.seconds - elapsed))
            view.status(node, time.monotonic() - t0)
        # Wait (bounded) for the last announced items' verdicts to arrive.
        wait_until = time.monotonic() + 5.0
        while time.monotonic() < wait_until and node.scheduler.in_flight > 0:
            time.sleep(0.1)
    finally:
        node.stop()
        operator.stop()
        time.sleep(0.3)  # let the controller receive the last verdicts
        controller.stop()
        node.inspector.close()
    summary = summarize(node, controller, world, recorder, cfg)
    print(json.dumps(summary, indent=2), file=out, flush=True)
    if opts.summary_json is not None:
        opts.summary_json.parent.mkdir(parents=True, exist_ok=True)
        opts.summary_json.write_text(json.dumps(summary, indent=2) + "\n")
    return summary
