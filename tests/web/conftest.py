"""A real node on the synthetic conveyor, with its HTTP endpoint, for the web tests.

``live_node`` (package scope: one run shared by every web test) starts
Debian's mosquitto on a free loopback port, the node with the shipped models
(ONNX Runtime, CPU), an audit snapshot store, the live feed and the HTTP
server on an ephemeral 127.0.0.1 port, and the simulated sortation
controller announcing items (30 % damaged). Tests wait for what they need
(`LiveNode.wait_for`); `LiveNode.quiesce` stops new items and waits until
every verdict is out, so counters can be compared.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edge.app.build import build_node
from edge.app.service import BeltMonitor
from edge.audit.store import SnapshotStore
from edge.clock import WallClock
from edge.config import Config, HttpConfig, load_config
from edge.pipeline.node import Node, NodeHooks
from edge.publish.broker import MosquittoBroker
from edge.publish.topics import Topics
from edge.sim.controller import ControllerSimulator
from edge.sim.conveyor import SyntheticConveyor
from edge.web.live import LiveFeed
from edge.web.server import HttpServer, start_http

REPO = Path(__file__).resolve().parents[2]
#: Screenshots and other artefacts people look at after a CI run.
TEST_OUTPUT = REPO / "test-output" / "web"


@dataclass
class LiveNode:
    cfg: Config
    node: Node
    world: SyntheticConveyor
    controller: ControllerSimulator
    store: SnapshotStore
    live: LiveFeed
    http: HttpServer

    @property
    def url(self) -> str:
        return self.http.url

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, str]:
        req = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as res:
                return res.status, res.read(), res.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            return err.code, err.read(), err.headers.get("Content-Type", "")

    def status(self) -> dict[str, Any]:
        code, body, _ = self.get("/api/status")
        assert code == 200
        data: dict[str, Any] = json.loads(body)
        return data

    @staticmethod
    def wait_for(what: str, check: Callable[[], bool], timeout_s: float = 60.0) -> None:
        until = time.monotonic() + timeout_s
        while not check():
            if time.monotonic() > until:
                raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            time.sleep(0.2)

    def quiesce(self, timeout_s: float = 30.0) -> None:
        """No new items; wait until every item is decided and every verdict acknowledged."""
        self.world.induct_cutoff_ms = self.node.clock.now_ms() - self.world.start_ms
        belt = self.cfg.belt
        travel_s = (belt.induct_to_camera_m + belt.camera_to_divert_m) / belt.speed_mps
        time.sleep(min(travel_s, timeout_s / 2))
        self.wait_for("items in flight to finish", lambda: (
            self.node.scheduler.in_flight == 0 and self.node.publisher.outbox_depth == 0),
            timeout_s)
        seen = -1
        while seen != self.controller.verdict_count():  # the last verdicts reach the controller
            seen = self.controller.verdict_count()
            time.sleep(0.5)


def _config(tmp: Path, broker_url: str) -> Config:
    cfg = load_config(None)
    return dataclasses.replace(
        cfg,
        synthetic=dataclasses.replace(cfg.synthetic, seed=21, damage_rate=0.3,
                                      items_per_second=2.5, touching_rate=0.0),
        belt=dataclasses.replace(cfg.belt, speed_mps=2.0, induct_to_camera_m=1.0,
                                 camera_to_divert_m=3.0),
        mqtt=dataclasses.replace(cfg.mqtt, url=broker_url),
        storage=dataclasses.replace(cfg.storage, state_dir=tmp, snapshots_min_free_mb=0.0),
        models=dataclasses.replace(cfg.models, gallery_dir=tmp / "gallery",
                                   engine_cache=tmp / "engines"))


@pytest.fixture(scope="package")
def live_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveNode]:
    """The node running on the synthetic conveyor with /metrics and the live page."""
    if shutil.which("mosquitto") is None:
        pytest.skip("Debian's mosquitto is not installed")
    tmp = tmp_path_factory.mktemp("live-node")
    broker = MosquittoBroker(tmp / "broker")
    broker.start()
    cfg = _config(tmp, broker.url)
    clock = WallClock()
    live = LiveFeed()
    store = SnapshotStore(tmp / "snapshots", cfg.storage)
    monitor = BeltMonitor()  # the belt check, as the page shows it
    hooks = live.wrap(NodeHooks(on_frameset=monitor.on_frameset))
    built = build_node(cfg, clock, outbox_path=tmp / "outbox.sqlite", hooks=hooks,
                       snapshots=store, belt_start_delay_ms=300.0)
    node, world = built.node, built.world
    assert world is not None
    monitor.watch(built.cameras.calibrations)
    http = start_http(HttpConfig(port=0, live_page=True), node, live=live,
                      calibration=lambda: monitor.results)
    topics = Topics(cfg.mqtt.topic_prefix, cfg.node.line_id, cfg.node.node_id)
    controller = ControllerSimulator(cfg.mqtt.url, topics, clock,
                                     world.due_announcements)
    store.start()
    node.start()
    try:
        assert node.publisher.wait_connected(10.0)
        controller.start()
        # A frameset may lack a camera; check until every camera has a belt-check result.
        LiveNode.wait_for("a belt check of every camera", lambda: "last" in monitor.latest
                          and len(monitor.run()) == len(node.cameras.sources), 30.0)
        yield LiveNode(cfg, node, world, controller, store, live, http)
    finally:
        node.stop()
        store.close()
        controller.stop()
        http.shutdown()
        node.inspector.close()
        broker.close()
