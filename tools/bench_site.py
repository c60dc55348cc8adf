"""Benchmark: the site's shared gallery under 20 nodes' worth of traffic on one broker.

Simulated nodes (a paho client each, not full nodes) put every product's retained
shared-gallery message (views that reuse a few golden crops, with their real features) and
their retained status, refreshed every second, on an embedded mosquitto. One real sharing
component (ONNX Runtime models, gallery and held sets on disk) then starts and catches up
from the retained messages; after that the simulated nodes publish new versions one at a
time, and each one's publish -> learned latency is measured. Run:

    .venv/bin/python tools/bench_site.py --nodes 20 --products 1000 --live 50

It prints a markdown report on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion

from edge.catalogue import Catalogue
from edge.clock import WallClock
from edge.commands.models import memory_inspector
from edge.config import DEFAULT_MANIFEST, ModelsConfig, MqttConfig, NodeConfig, SiteConfig
from edge.infer.golden import load_golden
from edge.infer.inspector import ItemInspector
from edge.publish.broker import MosquittoBroker
from edge.publish.payloads import dumps, status_payload
from edge.site.gallery_backlog import Incoming
from edge.site.gallery_message import (
    HEADER_ALLOWANCE,
    GalleryMessage,
    SharedView,
    encode_view,
    gallery_topic,
    merge_views,
    render_message,
)
from edge.site.gallery_metrics import SharingMetrics
from edge.site.gallery_share import GallerySharing
from edge.types import U8Array

PREFIX = "conveyor-vision"
SITE = "bench-site"
CAMERAS = ("top", "angled")
#: (camera, crop, patch features) of the golden set's intact items, per camera.
Pool = dict[str, list[tuple[U8Array, np.ndarray]]]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class SimNode:
    """One simulated node: its retained status every `interval_s`, and what it is told to
    publish."""

    def __init__(self, port: int, node_id: str, interval_s: float) -> None:
        self.node_id = node_id
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=f"sim-{node_id}")
        self.client.max_inflight_messages_set(100)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self._stop = threading.Event()
        self._interval_s = interval_s
        self._thread = threading.Thread(target=self._status, daemon=True)
        self._thread.start()

    def _status(self) -> None:
        topic = f"{PREFIX}/line-{self.node_id}/{self.node_id}/status"
        while not self._stop.is_set():
            payload = status_payload("online", node_id=self.node_id, line_id=f"line-{self.node_id}",
                                     now_ms=time.time() * 1000.0, versions={"node": "bench"},
                                     health={"stalled_stages": [], "outbox_depth": 0})
            self.client.publish(topic, dumps(payload), qos=1, retain=True)
            self._stop.wait(self._interval_s)

    def publish(self, topic: str, payload: bytes) -> paho.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=1, retain=True)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.client.disconnect()
        self.client.loop_stop()


def _pool(inspector: ItemInspector) -> Pool:
    golden = load_golden(DEFAULT_MANIFEST.parent / "golden" / "golden.npz")
    intact = [r for r, label in zip(golden.records, golden.labels, strict=True)
              if label in ("none", "confounder")]
    pool: Pool = {}
    for cam in CAMERAS:
        crops = [np.ascontiguousarray(r.crops[cam].color) for r in intact]
        patches, _ = inspector.judge_views(crops)
        pool[cam] = list(zip(crops, patches, strict=True))
    return pool


def _message(model: str, product: str, node: str, version: int, views: list[SharedView]
             ) -> bytes:
    return render_message(GalleryMessage(SITE, product, model, node, version,
                                         int(time.time() * 1000), tuple(views)))


def _views(pool: Pool, i: int, node: str, learned_ms: int, extra: bool = False
           ) -> list[SharedView]:
    """Product `i`'s views: one per camera (crops reused across products); `extra` adds a
    third, new to the product."""
    n = len(pool["top"])
    picks = [("top", i % n), ("angled", (i + 1) % n)] + ([("top", (i + 2) % n)] if extra else [])
    return [encode_view(cam, node, learned_ms + k, *pool[cam][j])
            for k, (cam, j) in enumerate(picks)]


def _largest(pool: Pool, model: str, max_kb: int) -> tuple[int, int]:
    """Views and bytes of the largest message under `max_kb`, from distinct crops."""
    views = [encode_view(cam, "bench-00", 1000 + k, np.ascontiguousarray(c[::s, ::s]), p)
             for s in (1, -1) for cam in CAMERAS for k, (c, p) in enumerate(pool[cam])]
    kept = merge_views(views, per_camera=32, budget_bytes=max_kb * 1024 - HEADER_ALLOWANCE)
    return len(kept), len(_message(model, "P-0000", "bench-00", 1, kept))


def _until(check: Callable[[], bool], timeout_s: float, step_s: float = 0.005) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(step_s)
    return check()


def _catalogue(inspector: ItemInspector, products: list[str]) -> None:
    base = inspector.catalogue.products
    inspector.catalogue = Catalogue(base + tuple(dataclasses.replace(base[0], product_id=p)
                                                 for p in products))


def _timed_merges(sharing: GallerySharing) -> list[float]:
    """Instruments the worker: seconds per message handled (merge, learn, write)."""
    times: list[float] = []
    handle = sharing._handle

    def timed(job: Incoming) -> None:
        start = time.perf_counter()
        handle(job)
        times.append(time.perf_counter() - start)

    sharing._handle = timed  # type: ignore[method-assign]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=20, help="simulated nodes")
    parser.add_argument("--products", type=int, default=1000)
    parser.add_argument("--live", type=int, default=50, help="new versions after catch-up")
    parser.add_argument("--status-interval", type=float, default=1.0)
    parser.add_argument("--max-kb", type=int, default=1024, help="site.max_message_kb")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    with tempfile.TemporaryDirectory() as tmp, MosquittoBroker(Path(tmp) / "broker") as broker:
        _run(args, Path(tmp), broker)


def _run(args: argparse.Namespace, tmp: Path, broker: MosquittoBroker) -> None:
    inspector = memory_inspector(ModelsConfig(manifest=DEFAULT_MANIFEST, max_batch=8),
                                 tmp / "gallery")
    inspector.gallery.flush()
    threshold = float(inspector.manifest.thresholds["components"]["damage"])
    pool = _pool(inspector)
    products = [f"B-{i:04d}" for i in range(args.products)]
    _catalogue(inspector, products)
    sims = [SimNode(broker.port, f"bench-{k:02d}", args.status_interval)
            for k in range(args.nodes)]
    sharing = GallerySharing(
        SiteConfig(site_id=SITE, share_gallery=True, allowed_nodes=tuple(s.node_id for s in sims),
                   max_message_kb=args.max_kb), MqttConfig(url=broker.url),
        NodeConfig(node_id="bench-node"), tmp / "state", WallClock())
    sharing.share(inspector, lambda: threshold)
    model = sharing.model_id or ""
    sizes, infos = [], []
    base_ms = int(time.time() * 1000)
    t0 = time.monotonic()
    for i, product in enumerate(products):
        sim = sims[i % len(sims)]
        payload = _message(model, product, sim.node_id, 1, _views(pool, i, sim.node_id, base_ms))
        sizes.append(len(payload))
        infos.append(sim.publish(gallery_topic(PREFIX, SITE, product, model), payload))
    for info in infos:
        info.wait_for_publish(60.0)
    retain_s = time.monotonic() - t0
    merges = _timed_merges(sharing)
    t0 = time.monotonic()
    sharing.start()
    done = _until(lambda: sharing.metrics().messages.get("merged", 0) >= len(products),
                  3600.0, 0.05)
    catch_up_s = time.monotonic() - t0
    caught = sharing.metrics()
    merges = merges[:]  # the catch-up's only
    live = _live(args, sims, sharing, inspector, pool, products, model)
    sharing.stop()
    restart_s = _restart(args, sims, broker, inspector, tmp, threshold)
    for sim in sims:
        sim.close()
    held = sum(p.stat().st_size for p in (tmp / "state").rglob("*.json"))
    views, largest = _largest(pool, model, args.max_kb)
    _report(args, sizes, retain_s, (catch_up_s, restart_s), done, caught, merges, live, held,
            views, largest)


def _restart(args: argparse.Namespace, sims: list[SimNode], broker: MosquittoBroker,
             inspector: ItemInspector, tmp: Path, threshold: float) -> float:
    """Seconds a restarted node takes to go through the retained messages it already holds."""
    sharing = GallerySharing(
        SiteConfig(site_id=SITE, share_gallery=True, allowed_nodes=tuple(s.node_id for s in sims),
                   max_message_kb=args.max_kb), MqttConfig(url=broker.url),
        NodeConfig(node_id="bench-node"), tmp / "state", WallClock())
    sharing.share(inspector, lambda: threshold)
    t0 = time.monotonic()
    sharing.start()
    _until(lambda: sharing.metrics().messages.get("unchanged", 0) >= args.products, 3600.0, 0.05)
    seconds = time.monotonic() - t0
    sharing.stop()
    return seconds


def _live(args: argparse.Namespace, sims: list[SimNode], sharing: GallerySharing,
          inspector: ItemInspector, pool: Pool, products: list[str], model: str) -> list[float]:
    """Seconds from a new version's publish to the node's gallery holding its new view."""
    latencies = []
    chosen = np.random.default_rng(0).choice(len(products), min(args.live, len(products)),
                                             replace=False)  # each product's new view once
    for j, i in enumerate(int(k) for k in chosen):
        product, sim = products[i], sims[(i + 1 + j) % len(sims)]
        views = _views(pool, i, sim.node_id, int(time.time() * 1000), extra=True)
        before = inspector.gallery.views(product, "top")
        payload = _message(model, product, sim.node_id, 2 + j, views)

        def learned(p: str = product, b: int = before) -> bool:
            return inspector.gallery.views(p, "top") > b

        t0 = time.monotonic()
        sim.publish(gallery_topic(PREFIX, SITE, product, model), payload)
        if _until(learned, 10.0):
            latencies.append(time.monotonic() - t0)
        assert sharing.wait_idle(30.0)
    return latencies


def _report(args: argparse.Namespace, sizes: list[int], retain_s: float,
            catch_up: tuple[float, float], done: bool, caught: SharingMetrics,
            merges: list[float], live: list[float], held: int, views: int,
            largest: int) -> None:
    print(f"## Shared gallery: {args.nodes} simulated nodes, {args.products} products\n")
    print("| figure | value |\n| --- | --- |")
    typical = statistics.median(sizes) / 1024
    print(f"| retained per product, 2 views (one per camera) | {typical:.0f} KiB |")
    print(f"| retained per product at the {args.max_kb} KiB limit | {views} views, "
          f"{largest / 1024:.0f} KiB |")
    print(f"| retained in all ({args.products} products) | {sum(sizes) / 2**20:.0f} MiB |")
    print(f"| publishing them (simulated nodes, QoS 1) | {retain_s:.1f} s |")
    print(f"| catch-up at start, every product learned | {catch_up[0]:.1f} s"
          f"{'' if done else ' (NOT finished)'} |")
    print(f"| catch-up at a restart, nothing new | {catch_up[1]:.1f} s |")
    print(f"| worker time per message, p50 / p99 | {1000 * statistics.median(merges):.0f} / "
          f"{1000 * _pct(merges, 99):.0f} ms ({len(merges)} messages) |")
    if live:
        print(f"| live: publish -> view learned, p50 / p99 | {1000 * statistics.median(live):.0f}"
              f" / {1000 * _pct(live, 99):.0f} ms ({len(live)} messages) |")
    print(f"| held sets on disk | {held / 2**20:.0f} MiB |")
    print(f"\nmessages by outcome at catch-up: {dict(caught.messages)}")


if __name__ == "__main__":
    main()
