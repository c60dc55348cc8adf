"""The site's shared gallery: views one node learns reach the others through a real broker."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import jsonschema  # type: ignore[import-untyped]
import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from edge.app.build import build_node
from edge.clock import WallClock
from edge.commands.models import memory_inspector
from edge.config import (
    DEFAULT_MANIFEST,
    ConfigError,
    DecisionConfig,
    ModelsConfig,
    MqttConfig,
    NodeConfig,
    SiteConfig,
    TlsConfig,
    config_from_mapping,
    load_config,
)
from edge.infer.golden import GoldenSet, load_golden
from edge.infer.inspector import ItemInspector
from edge.pipeline.feedback import FeedbackLearner, RecentViews
from edge.publish import SCHEMA_DIR
from edge.publish.broker import BrokerTls, MosquittoBroker, free_port
from edge.site.client import SiteClient
from edge.site.gallery_message import (
    GalleryMessage,
    encode_view,
    gallery_topic,
    render_message,
)
from edge.site.gallery_share import GallerySharing
from edge.types import Decision, Feedback, ItemCrop, ItemRecord, Reason
from edge.verdicts.policy import VerdictPolicy
from tests.publish.test_tls import Authority

GOLDEN = DEFAULT_MANIFEST.parent / "golden" / "golden.npz"
SITE = "site-1"
NODES = ("edge-a", "edge-b", "edge-c")
PRODUCT = "P-CRACKS"  # an intact item (a crack-like print) and damaged ones in the golden set


@pytest.fixture(scope="module")
def golden() -> GoldenSet:
    return load_golden(GOLDEN)


def _item(golden: GoldenSet, product: str, label: str) -> ItemRecord:
    return next(r for r, lab in zip(golden.records, golden.labels, strict=True)
                if r.product_id == product and lab == label)


@dataclass
class _Node:
    """One node's gallery side: inspector, sharing, and the feedback learner that feeds it."""

    name: str
    inspector: ItemInspector
    sharing: GallerySharing
    recent: RecentViews
    learner: FeedbackLearner
    registry: CollectorRegistry

    def views(self, product: str = PRODUCT) -> dict[str, int]:
        return {cam: self.inspector.gallery.views(product, cam) for cam in ("top", "angled")}

    def anomaly(self, record: ItemRecord) -> float:
        raw = self.inspector.infer([record])[0].anomaly_raw
        assert raw is not None
        return raw

    def teach(self, record: ItemRecord) -> None:
        """Decide `record` as the node does, then report its packaging as changed."""
        policy = VerdictPolicy.from_manifest(self.inspector.manifest, DecisionConfig())
        self.recent.remember(record, policy.decide(record, self.inspector.infer([record])[0],
                                                   0.0))
        self.learner.on_feedback(Feedback(record.item_id, "packaging_changed",
                                          record.product_id, 0.0))


NodeFactory = Callable[..., _Node]


@pytest.fixture
def site(tmp_path: Path, mosquitto: MosquittoBroker) -> Iterator[NodeFactory]:
    """Builds and starts nodes; every one is stopped at teardown, before the broker."""
    nodes: list[_Node] = []

    def make(name: str, url: str | tuple[str, ...], *, allowed: tuple[str, ...] = NODES,
             threshold: float | None = None, max_kb: int = 1024) -> _Node:
        inspector = memory_inspector(ModelsConfig(manifest=DEFAULT_MANIFEST, max_batch=8),
                                     tmp_path / name / "gallery")
        inspector.gallery.flush()  # as a node's start writes its seeded gallery
        limit = (inspector.manifest.thresholds["components"]["damage"] if threshold is None
                 else threshold)
        sharing = GallerySharing(
            SiteConfig(site_id=SITE, share_gallery=True, allowed_nodes=allowed,
                       max_message_kb=max_kb), MqttConfig(url=url),
            NodeConfig(node_id=name, line_id=f"line-{name}"), tmp_path / name, WallClock())
        registry = CollectorRegistry()
        recent = RecentViews()
        learner = FeedbackLearner(inspector, recent, None, lambda *_: None,
                                  damage_threshold=lambda: limit, learn_per_hour=20,
                                  on_learned=sharing.share(inspector, lambda: limit, registry))
        sharing.start()
        node = _Node(name, inspector, sharing, recent, learner, registry)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.learner.close()
        node.sharing.stop(2.0)


def _until(check: Callable[[], bool], timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.02)
    return check()


def _settle(*nodes: _Node) -> None:
    """Every node's worker idle, twice with a pause between (a repair may follow a merge)."""
    for _ in range(2):
        time.sleep(0.3)
        for node in nodes:
            assert node.sharing.wait_idle(10.0)


def _retained(broker: MosquittoBroker, topic: str) -> paho.MQTTMessage:
    got: list[paho.MQTTMessage] = []
    done = threading.Event()
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)

    def on_message(_c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        got.append(msg)
        done.set()

    client.on_message = on_message
    client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        assert done.wait(5.0), f"no retained message on {topic}"
    finally:
        client.disconnect()
        client.loop_stop()
    return got[0]


def _publish(broker: MosquittoBroker, messages: list[tuple[str, bytes]]) -> None:
    """Retained, as a node would publish them."""
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    for topic, payload in messages:
        client.publish(topic, payload, qos=1, retain=True).wait_for_publish(5.0)
    client.disconnect()
    client.loop_stop()


def test_a_view_learned_on_one_node_reaches_the_others_and_lowers_their_anomaly(
        golden: GoldenSet, site: NodeFactory, mosquitto: MosquittoBroker) -> None:
    """packaging_changed on A: within 2 s B and C hold its views, score the item as less
    anomalous, still sideline a damaged item of that product; the retained message follows
    the schema, and nobody publishes it again (no echo loop)."""
    a, b, c = (site(name, mosquitto.url) for name in NODES)
    assert all(n.sharing.wait_connected(5.0) for n in (a, b, c))
    intact, crushed = _item(golden, PRODUCT, "confounder"), _item(golden, PRODUCT, "crush")
    before = {n.name: (n.views(), n.anomaly(intact)) for n in (b, c)}
    start = time.monotonic()
    a.teach(intact)
    grown = {n.name: {cam: v + 1 for cam, v in before[n.name][0].items()} for n in (b, c)}
    assert _until(lambda: all(n.views() == grown[n.name] for n in (b, c)), 2.0)
    assert time.monotonic() - start < 2.0
    policy = VerdictPolicy.from_manifest(b.inspector.manifest, DecisionConfig())
    for node in (b, c):
        assert node.anomaly(intact) < 0.5 * before[node.name][1]
        verdict = policy.decide(crushed, node.inspector.infer([crushed])[0], 0.0)
        assert verdict.decision == Decision.SIDELINE
        assert Reason.GEOMETRY in verdict.reasons  # the dent in its top, in depth
    _settle(a, b, c)
    assert [n.sharing.metrics().published for n in (a, b, c)] == [1, 0, 0]
    assert b.sharing.metrics().messages == {"merged": 1}
    assert a.sharing.metrics().messages == {"duplicate": 1}  # its own, echoed
    topic = gallery_topic("conveyor-vision", SITE, PRODUCT, a.sharing.model_id or "")
    msg = _retained(mosquitto, topic)
    assert msg.retain
    payload = json.loads(msg.payload)
    schema = json.loads((SCHEMA_DIR / "gallery.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(schema).validate(payload)
    assert (payload["node_id"], payload["version"]) == ("edge-a", 1)
    assert sorted(v["camera_id"] for v in payload["views"]) == ["angled", "top"]
    assert {v["node_id"] for v in payload["views"]} == {"edge-a"}


def test_a_node_started_later_catches_up_from_the_retained_message(
        golden: GoldenSet, site: NodeFactory, mosquitto: MosquittoBroker) -> None:
    """B starts after A learned (its first broker is down: it fails over to the second) and
    learns A's views from the retained message."""
    a = site("edge-a", mosquitto.url)
    assert a.sharing.wait_connected(5.0)
    a.teach(_item(golden, PRODUCT, "confounder"))
    assert _until(lambda: a.sharing.metrics().published == 1, 5.0)
    late = site("edge-b", (f"mqtt://127.0.0.1:{free_port()}", mosquitto.url))
    assert _until(lambda: late.views() == {"top": 5, "angled": 5}, 10.0)
    assert late.sharing.wait_idle(5.0)
    metrics = late.sharing.metrics()
    assert metrics.messages == {"merged": 1}
    assert metrics.client["failovers"] >= 1


def test_messages_that_fail_a_check_are_refused_and_counted(
        golden: GoldenSet, site: NodeFactory, mosquitto: MosquittoBroker) -> None:
    """From a node not allowed, of another model, oversized, malformed, against the schema,
    on another product's topic, or with features of another crop: each refused, counted by
    reason, and nothing learned."""
    b = site("edge-b", mosquitto.url, allowed=("edge-a",), max_kb=256)
    assert b.sharing.wait_connected(5.0)
    model = b.sharing.model_id or ""
    crop = _item(golden, PRODUCT, "confounder").crops["top"].color
    other = _item(golden, "P-POLY", "none").crops["top"].color
    patches = b.inspector.judge_views([crop, other])[0]
    now = int(time.time() * 1000)
    good = encode_view("top", "edge-a", now, crop, patches[0])
    forged = encode_view("top", "edge-a", now, crop, patches[1])  # another crop's features

    def message(product: str, sender: str = "edge-a", view: object = good,
                model_id: str = model) -> bytes:
        return render_message(GalleryMessage(SITE, product, model_id, sender, 1, now,
                                             (view,)))  # type: ignore[arg-type]

    def topic(product: str, model_id: str = model) -> str:
        return gallery_topic("conveyor-vision", SITE, product, model_id)

    banks = {p: b.views(p) for p in b.inspector.catalogue.ids()}
    _publish(mosquitto, [
        (topic("P-BOX-S"), message("P-BOX-S", sender="edge-x")),
        (topic("P-BOX-M", "0123456789abcdef@128"), message("P-BOX-M",
                                                           model_id="0123456789abcdef@128")),
        (topic("P-MAILER"), b"x" * (257 * 1024)),
        (topic("P-POLY"), b"{not json"),
        (topic("P-STAINS"), json.dumps({"schema_version": 1, "product_id": "P-STAINS"}).encode()),
        (topic("P-MULTI4"), message("P-CRACKS")),
        (topic(PRODUCT), message(PRODUCT, view=forged)),
    ])
    expected = {"refused_not_allowed": 1, "refused_other_model": 1, "refused_oversized": 1,
                "refused_malformed": 1, "refused_schema": 1, "refused_topic": 1,
                "refused_features": 1}
    assert _until(lambda: b.sharing.metrics().messages == expected, 10.0), \
        b.sharing.metrics().messages
    assert b.sharing.wait_idle(5.0)
    assert {p: b.views(p) for p in banks} == banks
    text = generate_latest(b.registry).decode()
    for outcome in expected:
        assert f'cv_site_gallery_messages_total{{outcome="{outcome}"}} 1.0' in text
    assert 'cv_site_gallery_messages_total{outcome="merged"} 0.0' in text


def test_a_view_failing_the_receiving_nodes_damage_check_is_not_merged(
        golden: GoldenSet, site: NodeFactory, mosquitto: MosquittoBroker) -> None:
    """A node whose check let a box with a torn-off flap through (threshold 1.1) shares it:
    B's own damage check (colour only: shared views carry no depth; here at 0.98, under both
    views' classifier scores) refuses both views, so B's gallery and its score of the damage
    stay as they were."""
    lax = site("edge-a", mosquitto.url, threshold=1.1)
    b = site("edge-b", mosquitto.url, threshold=0.98)
    assert lax.sharing.wait_connected(5.0)
    assert b.sharing.wait_connected(5.0)
    flap = _item(golden, "P-STAINS", "deconstruction")
    before = (b.views("P-STAINS"), b.anomaly(flap))
    lax.teach(flap)
    assert _until(lambda: b.sharing.metrics().views.get("damaged") == 2, 10.0)
    _settle(lax, b)
    assert (b.views("P-STAINS"), b.anomaly(flap)) == before
    assert b.sharing.metrics().messages == {"views_refused": 1}
    assert b.sharing.metrics().published == 0  # what B holds is nothing the message lacks


def test_nodes_learning_one_product_at_once_end_with_the_same_merged_set(
        golden: GoldenSet, site: NodeFactory, mosquitto: MosquittoBroker) -> None:
    """A and B learn a view each of one product at the same moment (both publish version 1):
    each holds both afterwards, the retained message has all four views, and the repair takes
    a bounded number of messages."""
    a, b = site("edge-a", mosquitto.url), site("edge-b", mosquitto.url)
    assert a.sharing.wait_connected(5.0)
    assert b.sharing.wait_connected(5.0)
    intact = _item(golden, PRODUCT, "confounder")
    turned = np.s_[::-1, ::-1]  # the item the other way round: other pixels, still intact
    flipped = dataclasses.replace(intact, item_id="golden-turned", crops={
        cam: ItemCrop(cam, np.ascontiguousarray(c.color[turned]), c.height_mm[turned].copy(),
                      c.mask[turned].copy(), has_depth=c.has_depth)
        for cam, c in intact.crops.items()})
    a.teach(intact)
    b.teach(flipped)
    assert _until(lambda: a.views() == b.views() == {"top": 6, "angled": 6}, 10.0)
    _settle(a, b)
    model = a.sharing.model_id or ""
    held = [n.sharing.store.load(model, PRODUCT) for n in (a, b)]
    assert held[0].views == held[1].views
    assert len(held[0].views) == 4
    payload = json.loads(_retained(mosquitto, gallery_topic("conveyor-vision", SITE, PRODUCT,
                                                            model)).payload)
    assert {v["sha256"] for v in payload["views"]} == {v.sha256 for v in held[0].views}
    assert a.sharing.metrics().published + b.sharing.metrics().published <= 4


def test_a_node_built_with_share_gallery_shares_what_its_feedback_teaches(
        golden: GoldenSet, tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    """build_node wires the sharing from `site:`: started with the node, told by the node's
    feedback learner, counted on the node's /metrics; the views reach the broker."""
    cfg = load_config(None)
    cfg = dataclasses.replace(
        cfg, node=NodeConfig(node_id="edge-a", line_id="line-a"),
        synthetic=dataclasses.replace(cfg.synthetic, items_per_second=0.0),
        mqtt=dataclasses.replace(cfg.mqtt, url=mosquitto.url),
        storage=dataclasses.replace(cfg.storage, state_dir=tmp_path / "state"),
        models=dataclasses.replace(cfg.models, gallery_dir=tmp_path / "state" / "gallery"),
        site=SiteConfig(site_id=SITE, share_gallery=True, allowed_nodes=NODES))
    node = build_node(cfg, WallClock(), golden_test=False).node
    sharing = next(c for c in node.channels if isinstance(c, GallerySharing))
    intact = _item(golden, PRODUCT, "confounder")
    node.start()
    try:
        assert sharing.wait_connected(5.0)
        node.recent.remember(intact, node.policy.decide(
            intact, node.inspector.infer([intact])[0], 0.0))
        node.feedback.on_feedback(Feedback(intact.item_id, "packaging_changed", PRODUCT, 0.0))
        topic = gallery_topic("conveyor-vision", SITE, PRODUCT, sharing.model_id or "")
        assert json.loads(_retained(mosquitto, topic).payload)["node_id"] == "edge-a"
        assert b"cv_site_gallery_published_total 1.0" in node.metrics.exposition()
    finally:
        node.stop()
        node.inspector.close()


def test_the_site_client_follows_the_nodes_connection_rules(
        tmp_path: Path, mosquitto_factory: Callable[..., MosquittoBroker]) -> None:
    """mqtts:// verified against the node's CA with its client certificate, its credentials
    file, MQTT 3.1.1: the site's client connects, subscribes and receives."""
    ca = Authority(tmp_path, "plant")
    server, client = ca.issue("broker", server=True), ca.issue("edge-a", server=False)
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "edge-a", "pw"], check=True,
                   capture_output=True)
    broker = mosquitto_factory(tls=BrokerTls(ca.path, server.cert, server.key),
                               extra_config=f"allow_anonymous false\npassword_file {passwd}")
    creds = tmp_path / "creds"
    creds.write_text("edge-a:pw\n")
    cfg = MqttConfig(url=broker.url, protocol="3.1.1", credentials_file=creds,
                     tls=TlsConfig(ca_file=ca.path, cert_file=client.cert, key_file=client.key))
    got: list[tuple[str, bytes]] = []
    site_client = SiteClient(cfg, "cv-edge-a-site", ["t/site/#"],
                             lambda topic, payload: got.append((topic, payload)))
    site_client.start()
    try:
        assert site_client.wait_connected(5.0)
        site_client.publish("t/site/x", b"retained", retain=True)
        assert _until(lambda: got == [("t/site/x", b"retained")], 5.0)
    finally:
        site_client.stop()


def test_the_site_section_of_the_config() -> None:
    """`site:` is off by default; node IDs and the site ID must be topic levels."""
    cfg = config_from_mapping({"site": {"site_id": "plant-7", "share_gallery": True,
                                        "allowed_nodes": ["edge-01", "edge-02"]}})
    assert cfg.site == SiteConfig("plant-7", True, ("edge-01", "edge-02"), 1024)
    assert config_from_mapping({}).site.share_gallery is False
    with pytest.raises(ConfigError, match=r"site\.allowed_nodes\[1\]"):
        config_from_mapping({"site": {"allowed_nodes": ["edge-01", "line/2"]}})
