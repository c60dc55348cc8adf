"""The one place the node is assembled: the service, the demo, the benchmarks and the tests
all build it here, so that what they run is the same node.

Order matters: the models load and pass their golden self-test before any camera opens (a
node whose models are wrong never streams), and the synthetic conveyor, when a camera uses
it, is built after the models so that its belt does not start moving during the seconds
they take to load. A shadow candidate, if any, loads on its own thread once the node runs
(one that fails is logged and left out: production never waits on it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from edge.app.cameras import open_cameras
from edge.app.channels import controller_channels, watch_node
from edge.audit.store import SnapshotStore
from edge.capture.source import FrameSource
from edge.catalogue import Catalogue, load_catalogue
from edge.clock import Clock
from edge.config import Config
from edge.infer.golden import golden_self_test
from edge.infer.inspector import ItemInspector
from edge.infer.reload import ModelRejectedError
from edge.perception.cameras import Cameras
from edge.pipeline.node import STALL_AFTER_S, Node, NodeHooks
from edge.pipeline.routing import VerdictChannel
from edge.pipeline.shadow import ShadowScorer
from edge.sim.conveyor import SyntheticConveyor

#: Told what start-up is doing: a step begins, or a gallery bank is re-embedded (the service
#: extends systemd's start timeout with each).
Progress = Callable[[str], object]
#: Wraps a camera's source (the benchmarks time every read).
SourceWrapper = Callable[[FrameSource], FrameSource]

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class BuiltNode:
    """A node, not yet started, with what was built for it."""

    node: Node
    cameras: Cameras
    catalogue: Catalogue
    #: the synthetic conveyor the synthetic cameras watch (None: no synthetic camera)
    world: SyntheticConveyor | None


def _ignore(_what: str) -> None:
    return None


def build_node(cfg: Config, clock: Clock, *, outbox_path: Path | None = None,
               hooks: NodeHooks | None = None, snapshots: SnapshotStore | None = None,
               on_progress: Progress | None = None, golden_test: bool = True,
               belt_start_delay_ms: float = 0.0, wrap_source: SourceWrapper | None = None,
               stall_after_s: float = STALL_AFTER_S,
               channels: Sequence[VerdictChannel] | None = None) -> BuiltNode:
    """Load and test the models, open the cameras and wire the node.

    Raises `ModelRejectedError` when the models miss their golden scores (`golden_test`:
    on for every node that inspects real items). The synthetic belt starts moving
    `belt_start_delay_ms` from now unless the config fixes its start. `snapshots` is
    started and closed by the caller; `channels` (other ways verdicts reach the controller
    side; default: those the config enables) are started and stopped with the node.
    """
    progress = on_progress or _ignore
    catalogue = load_catalogue()
    progress("loading models")
    inspector = ItemInspector.load(cfg.models, catalogue, on_progress=on_progress)
    if cfg.items.crop_size != inspector.size:
        # Works (crops are resized), but the models were trained and measured on crops cut
        # at their own input size: a smaller crop throws detail away, a larger one CPU.
        log.warning("crop_size_differs_from_models", crop_size=cfg.items.crop_size,
                    model_input=inspector.size, hint="set items.crop_size to the models' size")
    if golden_test:
        progress("golden self-test")
        # Models that do not reproduce their golden scores on this device never run (an update
        # with such models is then rolled back); the run also warms the backends up.
        report = golden_self_test(inspector)
        if not report.passed:
            inspector.close()
            raise ModelRejectedError(report)
    shadow = ShadowScorer.from_config(cfg, inspector, clock, snapshots=snapshots)
    progress("opening cameras")
    world = None
    synthetic = [c for c in cfg.cameras if c.source == "synthetic"]
    if synthetic:
        start = (cfg.synthetic.start_ms if cfg.synthetic.start_ms is not None
                 else clock.now_ms() + belt_start_delay_ms)
        world = SyntheticConveyor(cfg.synthetic, cfg.belt, synthetic, catalogue, start_ms=start)
    cameras = open_cameras(cfg, clock, world)
    if wrap_source is not None:
        cameras.sources = {cid: wrap_source(src) for cid, src in cameras.sources.items()}
    state = Path(cfg.storage.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    outbox = outbox_path or state / "outbox.sqlite"
    outbox.parent.mkdir(parents=True, exist_ok=True)
    if channels is None:
        channels = controller_channels(cfg, clock)
    node = Node(cfg, clock, cameras, inspector, catalogue, outbox_path=outbox, hooks=hooks,
                snapshots=snapshots, stall_after_s=stall_after_s, channels=channels,
                shadow=shadow)
    watch_node(node)
    return BuiltNode(node, cameras, catalogue, world)
