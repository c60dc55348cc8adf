"""What every measured run of `tools/bench_node.py` shares: the recorded workload, the
sources that time the reads, and the node built over them.

`tools/bench.py` calls `prepare` and `with_own_state` before it starts the children.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
import resource
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from edge.app.build import build_node
from edge.capture.buffers import FrameBuffers, HasFrameBuffers
from edge.capture.calibration import CameraCalibration, InspectionRegion
from edge.capture.recording import write_recording
from edge.capture.source import EndOfStream, FrameSource, SourceCounters
from edge.catalogue import load_catalogue
from edge.clock import WallClock
from edge.config import Config, config_to_mapping, load_config
from edge.pipeline.node import Node, NodeHooks
from edge.publish.mqtt import AckedVerdict
from edge.sim.conveyor import SyntheticConveyor
from edge.types import Frame

FPS = 15
ITEMS_PER_SECOND = 3.0


def base_config() -> Config:
    """The default node config at the bench's camera rate and item flow."""
    cfg = load_config(None)
    cams = tuple(dataclasses.replace(c, fps=FPS) for c in cfg.cameras)
    syn = dataclasses.replace(cfg.synthetic, items_per_second=ITEMS_PER_SECOND, damage_rate=0.05)
    return dataclasses.replace(cfg, cameras=cams, synthetic=syn)


def prepare(work: Path, seconds: float, seed: int) -> int:
    """Recordings, calibration files and the node config used by every child."""
    cfg = base_config()
    syn = dataclasses.replace(cfg.synthetic, seed=seed)
    # Recorded timestamps start in the future: an offline replay faster than real time then
    # never runs into item deadlines (those are measured by the real-time run).
    world = SyntheticConveyor(syn, cfg.belt, cfg.cameras, load_catalogue(),
                              start_ms=time.time() * 1000.0 + 3_600_000.0)
    count = round(seconds * FPS)
    cams = []
    for cam in cfg.cameras:
        rec = work / f"{cam.id}.db3"
        # Uncompressed: a live camera hands over raw frames; LZ4 decoding on playback would
        # cost 6 ms of CPU per frame that no deployed node spends.
        write_recording(rec, (world.render(cam.id, k) for k in range(count)), FPS,
                        compress=False)
        cal = CameraCalibration(serial=cam.id, intrinsics=world.intrinsics(cam.id),
                                pose=world.camera_pose(cam.id),
                                region=InspectionRegion(-450.0, 450.0, -300.0, 300.0))
        cal.save(work / f"{cam.id}.calibration.yaml")
        cams.append({**config_to_mapping(cam), "source": "recording", "recording": str(rec),
                     "calibration": str(work / f"{cam.id}.calibration.yaml"),
                     "realtime": False})
    mapping = config_to_mapping(cfg)
    mapping["cameras"] = cams
    _write_config(mapping, work)
    return count


def _write_config(mapping: dict[str, Any], workdir: Path) -> None:
    """`workdir/node.yaml`: the node config `mapping` with its state kept under `workdir`."""
    mapping["storage"]["state_dir"] = str(workdir / "state")
    mapping["models"]["gallery_dir"] = str(workdir / "state" / "gallery")
    (workdir / "node.yaml").write_text(yaml.safe_dump(mapping))


def with_own_state(work: Path, name: str) -> Path:
    """A workdir whose node reads `work`'s recordings but keeps its own state (outbox,
    gallery), for runs of the node at the same time."""
    other = work / name
    other.mkdir()
    _write_config(yaml.safe_load((work / "node.yaml").read_text()), other)
    return other


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class MemorySource:
    """The recorded frames of one camera, read once through `RealSenseSource` beforehand and
    replayed from memory: the same frames without the playback's decoding cost."""

    def __init__(self, inner: FrameSource) -> None:
        self._camera_id = inner.camera_id
        self._counters = SourceCounters()
        self._frames: list[Frame] = []
        inner.start()
        while True:
            try:
                frame = inner.read(1.0)
            except EndOfStream:
                break
            if frame is not None:
                self._frames.append(frame)
        inner.stop()
        self._next = 0

    @property
    def camera_id(self) -> str:
        return self._camera_id

    @property
    def counters(self) -> SourceCounters:
        return self._counters

    def start(self) -> None:
        self._next = 0

    def stop(self) -> None:
        pass

    def read(self, timeout_s: float) -> Frame | None:
        if self._next >= len(self._frames):
            raise EndOfStream(f"{self._camera_id}: replay done")
        frame = self._frames[self._next]
        self._next += 1
        self._counters.frames_received += 1
        return frame


class TimedSource:
    """Wraps a source and remembers when (wall clock) each recorded timestamp was read."""

    def __init__(self, inner: FrameSource, log: list[tuple[float, float]],
                 lock: threading.Lock, gate: threading.Event) -> None:
        self._inner = inner
        self._log = log
        self._lock = lock
        self._gate = gate

    @property
    def camera_id(self) -> str:
        return self._inner.camera_id

    @property
    def counters(self) -> SourceCounters:
        return self._inner.counters

    @property
    def frame_buffers(self) -> FrameBuffers:
        """The inner source's (AttributeError if it has none, as `HasFrameBuffers` expects)."""
        if not isinstance(self._inner, HasFrameBuffers):
            raise AttributeError("frame_buffers")
        return self._inner.frame_buffers

    def start(self) -> None:
        self._inner.start()

    def stop(self) -> None:
        self._inner.stop()

    def read(self, timeout_s: float) -> Frame | None:
        if not self._gate.wait(timeout_s):
            return None
        frame = self._inner.read(timeout_s)
        if frame is not None:
            with self._lock:
                bisect.insort(self._log, (frame.timestamp_ms, time.time() * 1000.0))
        return frame


@dataclasses.dataclass
class Run:
    """Wall-clock bookkeeping of one run."""

    reads: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    latencies_ms: list[float] = dataclasses.field(default_factory=list)
    #: the sources read nothing until this is set (the clock starts with the reads)
    gate: threading.Event = dataclasses.field(default_factory=threading.Event)
    first_read_ms: float | None = None
    last_ack_ms: float = 0.0
    acked: int = 0

    def on_acked(self, acked: AckedVerdict) -> None:
        now = time.time() * 1000.0
        with self.lock:
            self.acked += 1
            self.last_ack_ms = now
            if acked.captured_ms is None or not self.reads:
                return
            i = bisect.bisect_left(self.reads, (acked.captured_ms, -1.0))
            near = [self.reads[j] for j in (i - 1, i) if 0 <= j < len(self.reads)]
            captured = acked.captured_ms
            _ts, wall = min(near, key=lambda r: abs(r[0] - captured))
            self.latencies_ms.append(now - wall)


def build_timed(work: Path, broker: str, run: Run) -> Node:
    """The node of `work/node.yaml` on `broker`, its sources timed into `run`."""
    cfg = load_config(work / "node.yaml")
    cfg = dataclasses.replace(cfg, mqtt=dataclasses.replace(cfg.mqtt, url=broker))
    memory = os.environ.get("CV_BENCH_REPLAY", "recording") == "memory"

    def timed(src: FrameSource) -> FrameSource:
        return TimedSource(MemorySource(src) if memory else src, run.reads, run.lock, run.gate)

    # As `edge-node run` builds it: the golden self-test also warms the backends up.
    outbox = Path(cfg.storage.state_dir) / f"outbox-{os.getpid()}.sqlite"
    return build_node(cfg, WallClock(), outbox_path=outbox, wrap_source=timed,
                      hooks=NodeHooks(on_acked=run.on_acked)).node


def summary(node: Node, run: Run, wall_s: float, cpu_s: float) -> dict[str, object]:
    """A throughput run's rates, CPU, capture-to-PUBACK latency and peak memory."""
    frames = sum(c.source.counters.frames_received for c in node.captures.values())
    lat = run.latencies_ms
    return {
        "items_per_s": round(run.acked / wall_s, 3),
        "frames_per_s": round(frames / wall_s, 2),
        "items": run.acked,
        "frames": frames,
        "wall_s": round(wall_s, 3),
        "cpu_s": round(cpu_s, 3),
        "cpu_cores_used": round(cpu_s / wall_s, 2),
        "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 1) if lat else None,
                       "p99": round(float(np.percentile(lat, 99)), 1) if lat else None,
                       "what": "frame read to broker PUBACK"},
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def wait_acked(node: Node, run: Run, timeout_s: float = 30.0) -> None:
    """Until the outbox is empty (every verdict acknowledged) or `timeout_s` has passed."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and node.publisher.outbox_depth > 0:
        time.sleep(0.02)

