"""The shared gallery: the reference views a node learns from `packaging_changed` feedback go
to the other nodes of its site through the broker, and theirs are learned here
(docs/mqtt.md#shared-gallery; off unless `site.share_gallery`).

Each product and embedding model has one retained message, which carries the merged set of
the site's shared views of it. A node that learns views merges them into what it holds and
publishes the set with the next version. A node that receives a set checks it (size, schema,
sender in `site.allowed_nodes`, its own embedding model, features that its model computes
for the crops too), runs its own damage check on each view it does not hold yet (a damaged or
poisoned view on one line must not spread), learns the views that pass into its gallery, and
keeps the merged set (`gallery_store`). Where it holds views the message lacks (two nodes
learned at once), it publishes the merged set again; merging is a union capped the same way
on every node, so this settles after one round. Started after the change, a node catches up
from the retained messages, which the broker sends on every subscription.

Threads: paho's network thread (`SiteClient`) only sorts messages out and queues them; one
worker thread (``site-gallery``) does the rest, as embedding, damage checks and file writes
must not hold up the network loop. The queue is bounded in bytes; what it drops is fetched
again by subscribing anew once the worker has caught up.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import structlog
from prometheus_client.registry import CollectorRegistry

from edge.infer.gallery import MAX_VIEWS
from edge.infer.inspector import ItemInspector, embedding_identity
from edge.pipeline.feedback import OnLearned
from edge.site.client import SiteClient
from edge.site.gallery_backlog import Backlog, Incoming, Learned
from edge.site.gallery_message import (
    HEADER_ALLOWANCE,
    GalleryMessage,
    MessageRefusedError,
    SharedView,
    decode_crop,
    decode_features,
    encode_view,
    features_match,
    gallery_root,
    gallery_topic,
    is_topic_id,
    merge_views,
    parse_message,
    render_message,
    topic_parts,
)
from edge.site.gallery_metrics import SharingCollector, SharingMetrics
from edge.site.gallery_store import Held, SharedStore
from edge.workers import WorkerThread

if TYPE_CHECKING:
    import paho.mqtt.client as paho

    from edge.clock import Clock
    from edge.config import Config, MqttConfig, NodeConfig, SiteConfig
    from edge.types import U8Array, Verdict

log = structlog.get_logger(__name__)

#: Relative L2 distance within which another node's features are this model's for the crop
#: (float16 rounding: 2e-4; another crop or a flipped one: 0.3 and more).
FEATURE_TOLERANCE = 0.1
#: Messages waiting for the worker, in bytes (a thousand products' messages take a few
#: hundred megabytes: those beyond are fetched again later, not held).
BACKLOG_BYTES = 64 << 20
#: This node's learned items waiting to be shared.
LEARNED_WAITING = 64
#: Views refused by the damage check, remembered so that a set is not judged again.
REFUSED_KEPT = 10_000


class GallerySharing:
    """The shared gallery of one node. A `VerdictChannel` for its lifecycle only (started and
    stopped with the node; verdicts are ignored); `share` ties it to the node's inspector."""

    def __init__(self, site: SiteConfig, mqtt: MqttConfig, node: NodeConfig, state_dir: Path,
                 clock: Clock, *, environ: Mapping[str, str] | None = None) -> None:
        self.site_id = site.site_id
        self.node_id = node.node_id
        self._prefix = mqtt.topic_prefix
        self._clock = clock
        self._allowed = frozenset(site.allowed_nodes)
        self.max_bytes = site.max_message_kb * 1024
        self._view_budget = self.max_bytes - HEADER_ALLOWANCE
        self.store = SharedStore(Path(state_dir) / "site-gallery")
        self._client = SiteClient(mqtt, f"{mqtt.client_id or 'cv-' + node.node_id}-site",
                                  [gallery_root(self._prefix, self.site_id) + "/+/+"],
                                  self._on_message, environ=environ)
        self._backlog = Backlog(BACKLOG_BYTES, LEARNED_WAITING)
        self._worker = WorkerThread("site-gallery", self._run, wake=self._backlog.wake)
        self._inspector: ItemInspector | None = None
        self._damage_threshold: Callable[[], float] | None = None
        self.model_id: str | None = None
        self._seen: dict[str, str] = {}  # topic -> digest of the message last handled or sent
        self._refused: OrderedDict[str, None] = OrderedDict()  # views failing the damage check
        self._resync = threading.Event()
        self._lock = threading.Lock()  # the counters and `_seen`
        self._messages: Counter[str] = Counter()
        self._views: Counter[str] = Counter()
        self._published = self._learned_dropped = 0
        self._unacked: list[paho.MQTTMessageInfo] = []

    @classmethod
    def from_config(cls, cfg: Config, clock: Clock) -> GallerySharing:
        return cls(cfg.site, cfg.mqtt, cfg.node, cfg.storage.state_dir, clock)

    def share(self, inspector: ItemInspector, damage_threshold: Callable[[], float],
              registry: CollectorRegistry | None = None) -> OnLearned:
        """Share what `inspector`'s gallery learns and learn into it what the site shares,
        under `damage_threshold` (the one in use); returns what the feedback learner calls
        with the views it learned. Before `start`."""
        self._inspector = inspector
        self._damage_threshold = damage_threshold
        self.model_id = embedding_identity(inspector.manifest)
        if registry is not None:
            registry.register(SharingCollector(self.metrics))
        return self.learned

    # --- VerdictChannel ------------------------------------------------------------------

    def offer(self, verdict: Verdict, seq: int) -> None:
        """Verdicts are not shared."""

    def start(self) -> None:
        if self._inspector is None:
            raise RuntimeError("GallerySharing.share() was not called before start()")
        self._worker.start()
        self._client.start()
        log.info("site_gallery_starting", site_id=self.site_id, model=self.model_id,
                 allowed_nodes=sorted(self._allowed))

    def stop(self, timeout_s: float = 5.0) -> None:
        """Share the views learned and still waiting, then disconnect; messages received and
        not handled yet are left to the next start (they are retained)."""
        end = time.monotonic() + timeout_s
        self._worker.stop(timeout_s / 2)
        for info in self._unacked:
            with contextlib.suppress(RuntimeError, ValueError):  # gone with the connection
                if self._client.connected:
                    info.wait_for_publish(max(0.05, end - time.monotonic()))
        self._client.stop()
        log.info("site_gallery_stopped", published=self._published,
                 messages=dict(self._messages))

    # --- what the node calls -------------------------------------------------------------

    def learned(self, product_id: str, views: Mapping[str, U8Array]) -> None:
        """Views the gallery learned from feedback (the learner's thread): shared off it."""
        if not is_topic_id(product_id):
            log.warning("site_gallery_not_shared", product_id=product_id,
                        why="the product ID cannot be a topic level")
            return
        if not self._backlog.put_learned(Learned(product_id, dict(views),
                                                 int(self._clock.now_ms()))):
            with self._lock:
                self._learned_dropped += 1
            log.warning("site_gallery_not_shared", product_id=product_id,
                        why=f"{LEARNED_WAITING} learned items already wait to be shared")

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing waits for the worker (tests, benchmarks)."""
        return self._backlog.wait_idle(timeout_s)

    def wait_connected(self, timeout_s: float) -> bool:
        return self._client.wait_connected(timeout_s)

    def metrics(self) -> SharingMetrics:
        with self._lock:
            return SharingMetrics(dict(self._messages), dict(self._views), self._published,
                                  self._learned_dropped, self._backlog.bytes,
                                  self._client.connected, self._client.counts())

    # --- paho's network thread -----------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes) -> None:
        """Sort out what needs no work; queue the rest for the worker."""
        parts = topic_parts(topic, self._prefix, self.site_id)
        if parts is None:
            self._refuse(topic, "topic", "not a gallery topic")
        elif not payload:
            self._count("cleared")  # an operator removed the retained message
        elif len(payload) > self.max_bytes:
            self._refuse(topic, "oversized", f"{len(payload)} bytes, over site.max_message_kb")
        elif parts[1] != self.model_id:
            self._refuse(topic, "other_model", f"{parts[1]}, this node runs {self.model_id}")
        else:
            digest = hashlib.sha256(payload).hexdigest()
            with self._lock:
                known = self._seen.get(topic) == digest
            if known:
                self._count("duplicate")
            elif not self._backlog.put_message(Incoming(topic, payload, digest)):
                self._count("dropped_backlog")
                self._resync.set()  # fetched again once the worker has caught up

    # --- the worker ----------------------------------------------------------------------

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            job = self._backlog.take(0.5)
            if job is None:
                self._when_idle()
                continue
            self._do(job)
        for job in self._backlog.take_learned():  # this node's own views still go out
            self._do(job)

    def _do(self, job: Learned | Incoming) -> None:
        try:
            self._check_model()
            if isinstance(job, Learned):
                self._share_learned(job)
            else:
                self._handle(job)
        except Exception:  # one bad job costs itself, never the worker
            log.exception("site_gallery_failed", job=type(job).__name__)
            if isinstance(job, Incoming):
                self._count("error")
        finally:
            self._backlog.done()

    def _when_idle(self) -> None:
        if self._resync.is_set() and self._client.connected:
            self._resync.clear()
            log.info("site_gallery_resync", why="messages were dropped or the model changed")
            self._client.resubscribe()

    def _check_model(self) -> None:
        """A reload may have changed the embedding model: its own shared sets apply now."""
        assert self._inspector is not None
        model = embedding_identity(self._inspector.manifest)
        if model != self.model_id:
            log.info("site_gallery_model_changed", old=self.model_id, new=model)
            self.model_id = model
            self._resync.set()

    def _handle(self, job: Incoming) -> None:
        try:
            outcome = self._merge_message(job)
        except MessageRefusedError as exc:
            self._refuse(job.topic, exc.reason, exc.detail)
        else:
            self._count(outcome)
        with self._lock:
            self._seen[job.topic] = job.digest

    def _merge_message(self, job: Incoming) -> str:
        """Check a message, learn the views it adds; returns the outcome."""
        assert self._inspector is not None
        msg = parse_message(job.payload)
        if (topic_parts(job.topic, self._prefix, self.site_id)
                != (msg.product_id, msg.model_id) or msg.site_id != self.site_id):
            raise MessageRefusedError("topic", "the message names another site, product or model")
        if msg.node_id == self.node_id:
            self._note_version(msg)  # a restart's echo: the gallery has them already
            return "echo"
        if msg.node_id not in self._allowed:
            raise MessageRefusedError("not_allowed", f"sender {msg.node_id} is not in "
                                  "site.allowed_nodes")
        if msg.model_id != self.model_id:
            raise MessageRefusedError("other_model", msg.model_id)
        if self._inspector.catalogue.get(msg.product_id) is None:
            raise MessageRefusedError("unknown_product", msg.product_id)
        held = self.store.load(msg.model_id, msg.product_id)
        known = held.shas()
        fresh = [v for v in msg.views if v.sha256 not in known and v.sha256 not in self._refused]
        accepted = self._judge(fresh)
        merged = self._cap([*held.views, *(v for v, _ in accepted)])
        kept = {v.sha256 for v in merged}
        learn = [(v, crop) for v, crop in accepted if v.sha256 in kept]
        self._count_views("capped", len(accepted) - len(learn))
        self._learn(msg.product_id, learn)
        version = max(held.version, msg.version)
        if learn or version != held.version:
            self.store.save(msg.model_id, msg.product_id, Held(version, tuple(merged)))
        if kept - {v.sha256 for v in msg.views}:  # it lacks views held here: merged again
            self._publish(msg.product_id, merged, version)
        if learn:
            return "merged"
        return "views_refused" if fresh else "unchanged"

    def _note_version(self, msg: GalleryMessage) -> None:
        held = self.store.load(msg.model_id, msg.product_id)
        if msg.version > held.version:
            self.store.save(msg.model_id, msg.product_id, Held(msg.version, held.views))

    def _judge(self, fresh: Sequence[SharedView]) -> list[tuple[SharedView, U8Array]]:
        """The new views that pass: from an allowed node, features of this node's model,
        and this node's own damage check. Features that do not match refuse the message."""
        assert self._inspector is not None
        assert self._damage_threshold is not None
        views = [v for v in fresh if v.node_id in self._allowed or v.node_id == self.node_id]
        self._count_views("origin_not_allowed", len(fresh) - len(views))
        if not views:
            return []
        crops = [decode_crop(v, self._inspector.size) for v in views]
        theirs = [decode_features(v) for v in views]
        patches, damage = self._inspector.judge_views(crops)
        for view, features, mine in zip(views, theirs, patches, strict=True):
            if not features_match(features, mine, FEATURE_TOLERANCE):
                raise MessageRefusedError("features", f"view {view.sha256[:12]} of {view.node_id}: "
                                      f"its features are not what {self.model_id} computes")
        threshold = self._damage_threshold()
        passed = []
        for view, crop, score in zip(views, crops, damage, strict=True):
            if score < threshold:  # NaN fails too
                passed.append((view, crop))
                continue
            self._refused[view.sha256] = None
            while len(self._refused) > REFUSED_KEPT:
                self._refused.popitem(last=False)
            self._count_views("damaged")
            log.warning("site_gallery_view_refused", sha256=view.sha256[:12],
                        learned_by=view.node_id, camera=view.camera_id,
                        damage=round(score, 4), threshold=round(threshold, 4),
                        why="this node's damage check")
        return passed

    def _learn(self, product_id: str, learn: Sequence[tuple[SharedView, U8Array]]) -> None:
        assert self._inspector is not None
        by_camera: dict[str, list[U8Array]] = {}
        for view, crop in learn:
            by_camera.setdefault(view.camera_id, []).append(crop)
        for camera_id, crops in sorted(by_camera.items()):
            self._inspector.learn_views(product_id, camera_id, crops)  # persisted
        if learn:
            self._count_views("merged", len(learn))
            log.info("site_gallery_merged", product_id=product_id, views=len(learn),
                     learned_by=sorted({v.node_id for v, _ in learn}))

    def _share_learned(self, job: Learned) -> None:
        """This node's learned views, merged into what it holds, published."""
        assert self._inspector is not None
        assert self.model_id is not None
        size = self._inspector.size
        crops = {cam: _fit(c, size) for cam, c in sorted(job.views.items()) if is_topic_id(cam)}
        if not crops:
            return
        patches, _ = self._inspector.judge_views(list(crops.values()))
        mine = [encode_view(cam, self.node_id, job.learned_ms, crop, patches[i])
                for i, (cam, crop) in enumerate(crops.items())]
        held = self.store.load(self.model_id, job.product_id)
        merged = self._cap([*held.views, *mine])
        if not {v.sha256 for v in mine} & {v.sha256 for v in merged}:
            log.warning("site_gallery_not_shared", product_id=job.product_id,
                        why="a view alone is over site.max_message_kb")
            return
        self._publish(job.product_id, merged, held.version)

    def _publish(self, product_id: str, views: Sequence[SharedView], seen: int) -> None:
        """The set as this node holds it, retained, with the version after `seen`."""
        assert self.model_id is not None
        version = seen + 1
        self.store.save(self.model_id, product_id, Held(version, tuple(views)))
        payload = render_message(GalleryMessage(
            self.site_id, product_id, self.model_id, self.node_id, version,
            int(self._clock.now_ms()), tuple(views)))
        topic = gallery_topic(self._prefix, self.site_id, product_id, self.model_id)
        with self._lock:
            self._seen[topic] = hashlib.sha256(payload).hexdigest()  # its echo: a duplicate
            self._published += 1
        self._unacked = [i for i in self._unacked if not i.is_published()]
        self._unacked.append(self._client.publish(topic, payload, retain=True))
        log.info("site_gallery_published", product_id=product_id, version=version,
                 views=len(views), bytes=len(payload))

    def _cap(self, views: Sequence[SharedView]) -> list[SharedView]:
        return merge_views(views, per_camera=MAX_VIEWS, budget_bytes=self._view_budget)

    # --- counting ------------------------------------------------------------------------

    def _count(self, outcome: str) -> None:
        with self._lock:
            self._messages[outcome] += 1

    def _count_views(self, outcome: str, n: int = 1) -> None:
        if n:
            with self._lock:
                self._views[outcome] += n

    def _refuse(self, topic: str, reason: str, detail: str) -> None:
        self._count(f"refused_{reason}")
        # Other models' sets are expected while a model update rolls across the site.
        (log.debug if reason == "other_model" else log.warning)(
            "site_gallery_refused", topic=topic, reason=reason, detail=detail[:300])


def _fit(crop: U8Array, size: int) -> U8Array:
    """The crop at the embedding model's input size, as inference resizes it."""
    if crop.shape[:2] == (size, size):
        return np.ascontiguousarray(crop)
    out: U8Array = np.asarray(cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA),
                              np.uint8)
    return out
