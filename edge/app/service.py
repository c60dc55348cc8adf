"""The production node under systemd: start-up order, READY, watchdog, status, reload, stop.

READY=1 goes out only once the models are loaded (and pass their golden
self-test), the broker is connected and every camera streams. The watchdog
is pinged only while no stage is stalled. The belt part of the calibration
check runs at start and periodically, and its result is in the status.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from edge import __version__
from edge.app.build import build_node
from edge.app.systemd import SystemdNotifier, WatchdogPinger
from edge.audit.store import SnapshotStore
from edge.capture.calibration import CameraCalibration
from edge.capture.source import SourceError
from edge.clock import Clock, WallClock
from edge.config import Config
from edge.health_file import HealthFile, health_file_path
from edge.perception.belt_check import CHECK_FRAMES, BeltChecker
from edge.pipeline.node import Node, NodeHooks, stage_timings
from edge.types import FrameSet, U16Array
from edge.update.store import ReleaseStore, running_release_version
from edge.web.live import LiveFeed
from edge.web.server import start_http

log = structlog.get_logger(__name__)

#: How often the node publishes its health on `…/status`, and re-checks the belt.
STATUS_INTERVAL_S = 30.0
BELT_CHECK_INTERVAL_S = 600.0
#: How long a belt check waits for its frames (a third of a second at 30 fps); past it, the
#: check runs on the frames it has.
BELT_FRAMES_WAIT_S = 5.0
#: How often a belt check looks for a new frameset: well under a frame period.
_SAMPLE_POLL_S = 0.005
#: Start-up may take this long per step (models, broker, cameras) before systemd gives up.
STARTUP_STEP_USEC = 120_000_000


@dataclass(slots=True)
class BeltMonitor:
    """Runs the calibration belt check on `frames` recent depth frames of each calibrated
    camera, judged the way `edge-calibrate belt` accepted the belt (`BeltChecker`), so that
    one frame with a burst of dropouts does not fail it with nothing moved."""

    latest: dict[str, FrameSet] = field(default_factory=dict)
    results: dict[str, dict[str, object]] = field(default_factory=dict)
    last_run_mono: float = 0.0
    checkers: dict[str, BeltChecker] = field(default_factory=dict)
    frames: int = CHECK_FRAMES

    def watch(self, calibrations: Mapping[str, CameraCalibration]) -> None:
        """Check these cameras (those with a calibration), once the cameras are open."""
        self.checkers = {cam: BeltChecker(cal) for cam, cal in calibrations.items()}

    def on_frameset(self, frameset: FrameSet) -> None:
        self.latest["last"] = frameset  # a reference, no copy: run() samples it

    def due(self) -> bool:
        return time.monotonic() - self.last_run_mono > BELT_CHECK_INTERVAL_S

    def run(self, stop: threading.Event | None = None,
            timeout_s: float = BELT_FRAMES_WAIT_S) -> dict[str, dict[str, object]]:
        """Checks the next `frames` framesets (fewer if `timeout_s` or `stop` comes first)."""
        depths = self._sample(stop or threading.Event(), timeout_s)
        if not any(depths.values()):
            return self.results
        self.last_run_mono = time.monotonic()
        for cam_id, checker in self.checkers.items():
            frames = depths[cam_id]
            if not frames:
                continue
            result = checker.check_frames([d for d, _ in frames], frames[-1][1])
            self.results[cam_id] = result.as_dict()
            if not result.passed:
                log.warning("belt_check_failed", camera=cam_id, frames=len(frames),
                            reasons=list(result.reasons))
        return self.results

    def _sample(self, stop: threading.Event, timeout_s: float
                ) -> dict[str, list[tuple[U16Array, float]]]:
        """Depth and scale of each calibrated camera from the framesets as they arrive."""
        got: dict[str, list[tuple[U16Array, float]]] = {cam: [] for cam in self.checkers}
        seen: FrameSet | None = None
        framesets = 0
        deadline = time.monotonic() + timeout_s
        # A camera that has stopped delivering does not hold the others' check back for long.
        while any(len(d) < self.frames for d in got.values()) and framesets < 3 * self.frames:
            frameset = self.latest.get("last")
            if frameset is not None and frameset is not seen:
                seen, framesets = frameset, framesets + 1
                for cam_id, depths in got.items():
                    frame = frameset.frames.get(cam_id)
                    if frame is not None and len(depths) < self.frames:
                        # A copy: held, the frame's pooled buffer (or the item workers'
                        # shared-memory slot) could not be reused until the check ran.
                        depths.append((frame.depth.copy(), frame.depth_scale_m))
            if stop.wait(_SAMPLE_POLL_S) or time.monotonic() >= deadline:
                break
        return got

    def ok(self) -> dict[str, bool]:
        return {cam: bool(r.get("passed")) for cam, r in self.results.items()}


class NodeService:
    """Owns one `Node` for the life of the process."""

    def __init__(self, cfg: Config, clock: Clock | None = None) -> None:
        self.cfg = cfg
        self.clock = clock or WallClock()
        self.notifier = SystemdNotifier()
        self.live: LiveFeed | None = None  # the live page's view of the node (http.live_page)

    def _build(self) -> tuple[Node, BeltMonitor]:
        def extend(what: str) -> None:  # each step, and each gallery bank re-embedded
            self.notifier.extend_timeout(STARTUP_STEP_USEC, what)

        monitor = BeltMonitor()
        hooks = NodeHooks(on_frameset=monitor.on_frameset)
        if self.cfg.http.port and self.cfg.http.live_page:
            self.live = LiveFeed()
            hooks = self.live.wrap(hooks)
        state = Path(self.cfg.storage.state_dir)
        store = (SnapshotStore(state / "snapshots", self.cfg.storage)
                 if self.cfg.storage.snapshots else None)
        built = build_node(self.cfg, self.clock, hooks=hooks, snapshots=store, on_progress=extend)
        monitor.watch(built.cameras.calibrations)
        return built.node, monitor

    def run(self, stop: threading.Event, reload: threading.Event) -> int:
        node, monitor = self._build()
        health_file = HealthFile(health_file_path(Path(self.cfg.storage.state_dir)),
                                 running_release_version(__version__))
        pinger = WatchdogPinger(self.notifier, node.stalled_stages, summary=node.summary_line,
                                health_file=health_file)
        http = None
        if self.cfg.http.port:
            http = start_http(self.cfg.http, node, live=self.live,
                              calibration=lambda: monitor.results)
        if node.snapshots is not None:
            node.snapshots.start()
        node.start()
        pinger.start()
        try:
            self._wait_ready(node, stop)
            if not stop.is_set():
                pinger.mark_ready()
                monitor.run(stop)
                node.calibration_ok = monitor.ok()
                self.notifier.ready(node.summary_line())
                log.info("node_ready")
                self._report_last_update(node)
            next_status = 0.0
            while not stop.wait(0.5):
                if reload.is_set():
                    reload.clear()
                    self.notifier.reloading()
                    node.reload()
                    self.notifier.ready(node.summary_line())
                if monitor.due():
                    monitor.run(stop)
                    node.calibration_ok = monitor.ok()
                if time.monotonic() >= next_status:
                    next_status = time.monotonic() + STATUS_INTERVAL_S
                    log.info("node_health", summary=node.summary_line(),
                             stage_ms=stage_timings(node))
                    node.publisher.publish_status({**node.health(),
                                                   "calibration": monitor.results})
        finally:
            self.notifier.stopping("stopping: finishing items in flight")
            pinger.stop()
            node.stop()
            if node.snapshots is not None:
                node.snapshots.close()
            if http is not None:
                http.shutdown()
            health_file.remove()
            node.inspector.close()
        return 0

    @staticmethod
    def _report_last_update(node: Node) -> None:
        """A rollback's reason reaches the status topic once the old release runs again."""
        root = os.environ.get("CONVEYOR_VISION_ROOT")
        if not root:
            return
        event = ReleaseStore(Path(root)).last_event()
        if event is not None:
            node.publisher.publish_event("update", event.to_dict())

    def _wait_ready(self, node: Node, stop: threading.Event) -> None:
        """Until the broker is connected and every camera has delivered a frame or given up.
        READY means: every required camera (`cameras[].required`) streams. A required camera
        that gave up, or every camera giving up, fails the start, so that systemd restarts
        the node and tries the cameras anew; an optional camera that gave up does not hold
        READY back (the node reports itself degraded)."""
        required = {c.id for c in self.cfg.cameras if c.required}
        while not stop.is_set():
            states = node.camera_states()
            # An optional camera still coming up does not hold READY back either.
            waiting = [cid for cid, state in states.items()
                       if state == "waiting" and cid in required]
            if node.publisher.connected and not waiting:
                failed = {cid: state for cid, state in states.items() if state != "streaming"}
                missing = {cid: state for cid, state in failed.items() if cid in required}
                if len(failed) == len(states):
                    raise SourceError("no camera streams: " + _listed(failed))
                if missing:
                    raise SourceError("required camera not streaming: " + _listed(missing))
                if failed:
                    log.error("ready_without_optional_cameras", failed=failed)
                return
            self.notifier.extend_timeout(STARTUP_STEP_USEC, "waiting for " + ", ".join(
                what for what, ok in (("broker", node.publisher.connected),
                                      ("cameras " + ", ".join(waiting), not waiting)) if not ok))
            stop.wait(0.2)


def _listed(states: Mapping[str, str]) -> str:
    return "; ".join(f"{cid} {state}" for cid, state in states.items())
