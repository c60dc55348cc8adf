"""Shadow scoring: a candidate model set judges every judged item beside the production
models, on its own thread, and never decides anything: in the node through a real mosquitto,
and the scorer on its own with the shipped models."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from edge.app.build import build_node
from edge.audit.files import read_sidecar
from edge.audit.shadow_record import SHADOW_RECORD_FILE, ShadowRecord, load_shadow_record
from edge.audit.store import SnapshotStore
from edge.catalogue import load_catalogue
from edge.clock import WallClock
from edge.commands.main import main
from edge.config import Config, config_to_mapping, load_config
from edge.infer.gallery import ReferenceGallery
from edge.infer.inspector import DAMAGE, EMBEDDING, ItemInspector
from edge.infer.manifest import load_manifest
from edge.infer.runtimes import open_backend
from edge.pipeline.node import Node
from edge.pipeline.shadow import ShadowScorer, ShadowTally
from edge.publish.broker import MosquittoBroker
from edge.publish.topics import Topics
from edge.sim.controller import ControllerSimulator
from edge.sim.conveyor import SyntheticConveyor
from edge.types import Decision, ItemRecord
from tests.audit.candidates import broken_manifest, candidate_manifest
from tests.audit.helpers import synthetic_records, verdict_for
from tests.publish.helpers import Collector, validator, wait_until

Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _config(tmp_path: Path, broker: MosquittoBroker, candidate: Path, *, max_queue: int,
            snapshots_per_minute: int) -> Path:
    """A fast belt with a long way to the divert: items come soon and are judged in time,
    with pauses in which the candidate scores. Passed items are not sampled: a disagreement's
    snapshot is the shadow scorer's own. Written as YAML, for the node (as the service reads
    its config) and the commands."""
    cfg = load_config(None)
    state = tmp_path / "state"
    cfg = dataclasses.replace(
        cfg, synthetic=dataclasses.replace(cfg.synthetic, items_per_second=2.0, seed=3,
                                           damage_rate=0.2, touching_rate=0.0),
        belt=dataclasses.replace(cfg.belt, speed_mps=2.4, induct_to_camera_m=1.0,
                                 camera_to_divert_m=6.0),
        mqtt=dataclasses.replace(cfg.mqtt, url=broker.url),
        storage=dataclasses.replace(cfg.storage, state_dir=state, snapshot_pass_sample=0.0,
                                    snapshots_min_free_mb=0.0),
        models=dataclasses.replace(cfg.models, gallery_dir=state / "gallery",
                                   shadow=dataclasses.replace(
                                       cfg.models.shadow, manifest=candidate,
                                       max_queue=max_queue,
                                       max_snapshots_per_minute=snapshots_per_minute)))
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(config_to_mapping(cfg)))
    return path


@dataclasses.dataclass
class _Line:
    node: Node
    world: SyntheticConveyor
    store: SnapshotStore
    controller: ControllerSimulator
    topics: Topics
    collector: Collector

    def start(self) -> None:
        """The node and the controller; the belt stands still until `move`."""
        self.store.start()
        self.world.start_ms = time.time() * 1000.0 + 3_600_000.0
        self.node.start()
        assert self.node.publisher.wait_connected(10.0)
        self.controller.start()

    def move(self) -> None:
        # Soon, not now: the first items are not due before the cameras' next read.
        self.world.start_ms = time.time() * 1000.0 + 300.0

    def stop(self) -> None:
        self.node.stop()
        self.store.close()
        self.controller.stop()
        self.collector.close()
        self.node.inspector.close()


def _line(cfg: Config, broker: MosquittoBroker) -> _Line:
    store = SnapshotStore(Path(cfg.storage.state_dir) / "snapshots", cfg.storage)
    clock = WallClock()
    built = build_node(cfg, clock, snapshots=store, belt_start_delay_ms=300.0)
    assert built.world is not None
    topics = Topics(cfg.mqtt.topic_prefix, cfg.node.line_id, cfg.node.node_id)
    controller = ControllerSimulator(cfg.mqtt.url, topics, clock, built.world.due_announcements)
    collector = Collector(broker, f"{topics.root}/#", client_id="test-shadow-collector")
    return _Line(built.node, built.world, store, controller, topics, collector)


def _parse(text: bytes) -> Metrics:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode())
            for s in family.samples}


def _metrics(node: Node) -> Metrics:
    return _parse(node.metrics.exposition())


def _counts(record: ShadowRecord | None) -> tuple[str, int, int] | None:
    """Whose record, items scored, items failed."""
    return None if record is None else (
        record.candidate_sha256, record.items_scored, record.items_failed)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Fatal(BaseException):
    """What no `except Exception` catches: the scorer's thread ends with it."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.slow
def test_a_candidate_scores_every_judged_item_beside_production_and_reloads_like_it(
        tmp_path: Path, mosquitto_factory: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """A config naming a candidate that is not there loads, and the node starts without it:
    the candidate is looked for on the scorer's thread, never while the node is built. A
    candidate that comes later is loaded by a reload; an item its models raise on is counted
    as failed (in the record the update gate reads), one the scorer itself trips over (a
    publisher bug) as an error, and the next is scored. On SIGHUP a broken candidate (a
    model that does not match its checksum) is refused with an event and the one in use goes
    on scoring; another (new sha256) starts a record of its own. With items on the belt,
    each item the production models judged reaches the candidate once: scored (a `…/shadow`
    message valid against its schema, production's part equal to the verdict that went out)
    or skipped and counted. A disagreement is an audit snapshot marked as one, with both
    verdicts and what judged the item, up to `max_snapshots_per_minute`. The metrics, the
    shadow record and `edge-node shadow report` agree with the messages; no verdict misses
    its deadline. A scorer thread that ends anyway shows in the node's degraded list;
    production runs on."""
    broker = mosquitto_factory()
    candidate = tmp_path / "candidate" / "manifest.yaml"  # not there yet
    config = _config(tmp_path, broker, candidate, max_queue=8, snapshots_per_minute=3)
    cfg = load_config(config)
    state = Path(cfg.storage.state_dir)
    record_path = state / SHADOW_RECORD_FILE
    line = _line(cfg, broker)
    node, scorer = line.node, line.node.shadow
    assert scorer is not None
    assert scorer.counters.loads == {"loaded": 0, "refused": 0}  # not while building
    unreadable, flaky, late, lost = synthetic_records(4, damage_rate=0.0, seed=4)
    attempts: list[dict[str, Any]] = []  # what the flaky publisher was handed

    def publish(payload: bytes) -> bool:
        return node.publisher.publish_message(node.publisher.topics.shadow, payload)

    def flaky_publish(payload: bytes) -> bool:
        attempts.append(json.loads(payload))
        raise KeyError("a bug in the publisher")

    def fatal() -> bool:
        raise _Fatal

    def publishing(with_: Any, deciding: Any = node.inference.batch_lock.locked) -> None:
        scorer.attach(with_, queued=node.items_q.depth, deciding=deciding)

    def offer(record: ItemRecord, crops_from: ItemRecord | None = None) -> None:
        scorer.offer(record, verdict_for(crops_from or record, Decision.PASS))

    def shadow_messages(sha: str) -> list[dict[str, Any]]:
        return [m.json() for m in line.collector.on("/shadow")
                if m.json()["candidate"]["manifest_sha256"] == sha]

    def disagreeing(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [s for s in messages if s["disagreement"] is not None]

    def judged_on_the_belt() -> set[str]:
        return {m.json()["item_id"] for m in line.collector.on("/verdict")
                if m.json()["scores"] is not None}

    try:
        line.start()  # the belt stands still until `move`
        assert wait_until(lambda: scorer.counters.loads["refused"] == 1, 10.0)
        assert scorer.candidate is None
        assert scorer.worker_up
        assert "shadow scorer not running" not in node.degraded()
        assert math.isnan(_metrics(node)[("cv_shadow_agreement", ())])  # none scored yet
        candidate_manifest(candidate.parent, fused_scale=0.5, tag="other")
        assert scorer.reload() is None  # the shadow part of SIGHUP's work (node.reload below)
        assert scorer.candidate is not None
        second = scorer.candidate.sha256
        assert second == _sha256(candidate)
        offer(_unreadable(unreadable), unreadable)
        assert wait_until(lambda: scorer.snapshot()[1].failed == 1, 10.0)
        candidate.write_text(broken_manifest(tmp_path / "broken").read_text())
        assert node.reload()  # production's own models reload fine
        assert scorer.candidate is not None
        assert scorer.candidate.sha256 == second
        assert line.collector.wait_for(lambda msgs: any(
            m.json().get("kind") == "shadow_reload_refused" for m in msgs
            if m.topic.endswith("/events")), 10.0)
        publishing(flaky_publish)
        offer(flaky)
        assert wait_until(lambda: scorer.counters.errors == 1, 10.0)
        publishing(publish)
        assert wait_until(lambda: _counts(load_shadow_record(record_path)) == (second, 1, 1),
                          10.0)
        failing = _metrics(node)
        # What an operator's copy does: the same path, other contents.
        candidate.write_text(candidate_manifest(tmp_path / "first", fused_scale=0.001).read_text())
        first = _sha256(candidate)
        assert scorer.reload() is None
        assert scorer.candidate is not None
        assert scorer.candidate.sha256 == first
        assert scorer.snapshot()[1] == ShadowTally()  # a record of its own
        line.move()
        # More disagreements than the snapshot budget (the flaky item's may have used one).
        assert line.collector.wait_for(lambda _: len(disagreeing(shadow_messages(first))) + len(
            disagreeing(attempts)) >= 4, 60.0), _metrics(node)
        line.world.induct_cutoff_ms = time.time() * 1000.0 - line.world.start_ms
        line.controller.stop()
        assert wait_until(lambda: node.scheduler.in_flight == 0, 20.0)
        assert wait_until(lambda: len(shadow_messages(first)) + sum(
            scorer.snapshot()[2].skipped.values()) == len(judged_on_the_belt()), 20.0)
        before = scorer.snapshot()[1].scored
        offer(late)
        assert wait_until(lambda: scorer.snapshot()[1].scored == before + 1, 10.0)
        assert line.collector.wait_for(lambda _: len(shadow_messages(first)) == before + 1,
                                       5.0)
        kept = [s for s in disagreeing(shadow_messages(first)) if s["snapshot_id"] is not None]
        assert line.store.label(kept[0]["item_id"], "confirmed_damage")
        assert line.store.label(kept[1]["item_id"], "false_positive")
        live = _metrics(node)
        assert live[("cv_shadow_worker_up", ())] == 1.0
        publishing(publish, deciding=fatal)
        offer(lost)
        assert wait_until(lambda: not scorer.worker_up, 5.0)
        assert node.degraded() == ["shadow scorer not running"]
        assert node.health()["stalled_stages"] == []
        dead = _metrics(node)
    finally:
        line.stop()

    verdicts = {m.json()["item_id"]: m.json() for m in line.collector.on("/verdict")}
    shadow = [m.json() for m in line.collector.on("/shadow")]
    judged = {i for i, v in verdicts.items() if v["scores"] is not None}
    manual = {r.item_id for r in (unreadable, flaky, late)}  # `lost`: its scorer ended first
    counters = scorer.snapshot()[2]
    metrics = _metrics(node)
    assert len(shadow) == counters.messages["published"]
    assert counters.messages["not_sent"] == 0
    # Each item once: published, skipped, failed (unreadable) or lost to the error (flaky).
    assert len(shadow) + sum(counters.skipped.values()) + 1 + counters.errors == (
        len(judged) + len(manual))
    assert len({s["item_id"] for s in shadow}) == len(shadow)
    assert {s["item_id"] for s in shadow} <= judged | manual
    for message in shadow:
        validator("shadow").validate(message)
        if message["item_id"] in manual:
            continue
        verdict = verdicts[message["item_id"]]
        for key in ("decision", "reasons", "scores", "threshold_version", "model_versions"):
            assert message["production"][key] == verdict[key], key
        # The same models and gallery: the candidate's scores are production's, bit for bit.
        assert message["candidate"]["scores"] == verdict["scores"]
    # Disagreements: snapshots within the budget, each with both verdicts.
    disagreements = disagreeing([*shadow, *attempts])
    assert {s["disagreement"] for s in disagreeing(shadow)} == {"candidate_sidelines"}
    snapshots = [s for s in disagreements if s["snapshot_id"] is not None]
    assert counters.snapshots["kept"] == len(snapshots) >= 2
    assert counters.snapshots["rate_limited"] >= 1
    assert sum(counters.snapshots.values()) == len(disagreements)
    for message in snapshots:
        assert (message["production"]["decision"], message["candidate"]["decision"]) == (
            "pass", "sideline")
        sidecar = read_sidecar(state / "snapshots" / message["snapshot_id"])
        assert sidecar["verdict"]["decision"] == "pass"
        assert sidecar["shadow"]["disagreement"] == "candidate_sidelines"
        assert sidecar["shadow"]["candidate"]["decision"] == "sideline"
        assert sidecar["shadow"]["candidate"]["reasons"] == message["candidate"]["reasons"]
        assert sidecar["shadow"]["candidate_manifest"]["sha256"] == (
            message["candidate"]["manifest_sha256"])
        if message["item_id"] in manual:  # offered without what judged it: none made up
            assert "replay" not in sidecar
        else:  # what judged it, read as production decided it
            assert sidecar["replay"]["manifest"]["sha256"] == node.inspector.manifest.sha256
    # The metrics and the record: the candidate in use since the last swap.
    now = shadow_messages(first)
    agree = sum(s["agree"] for s in now)
    sidelined = sum(s["candidate"]["decision"] == "sideline" for s in now)
    assert (failing[("cv_shadow_items_scored", ())], failing[("cv_shadow_items_failed", ())]
            ) == (1.0, 1.0)
    assert metrics[("cv_shadow_items_scored", ())] == len(now)
    assert metrics[("cv_shadow_items_failed", ())] == 0
    assert metrics[("cv_shadow_disagreements", (("direction", "candidate_sidelines"),))
                   ] == len(now) - agree
    assert metrics[("cv_shadow_agreement", ())] == agree / len(now)
    assert metrics[("cv_shadow_sideline_rate", (("models", "candidate"),))] == (
        sidelined / len(now))
    assert metrics[("cv_shadow_worker_errors_total", ())] == 1
    assert live[("cv_shadow_candidate_info", (("sha256", first), ("version", now[0][
        "candidate"]["manifest_version"])))] == 1.0
    assert dead[("cv_shadow_worker_up", ())] == 0.0
    assert dead[("cv_shadow_candidate_loads_total", (("outcome", "refused"),))] == 2.0
    assert dead[("cv_shadow_candidate_loads_total", (("outcome", "loaded"),))] == 2.0
    record = load_shadow_record(record_path)
    assert record is not None
    assert (record.candidate_sha256, record.items_scored, record.items_failed,
            record.agreements, record.sidelined_candidate) == (first, len(now), 0, agree,
                                                               sidelined)
    event = next(m.json() for m in line.collector.on("/events")
                 if m.json()["kind"] == "shadow_reload_refused")
    assert "sha256" in event["detail"]["error"]
    assert event["detail"]["kept_candidate"]["sha256"] == second
    assert node.scheduler.stats().deadline_misses == 0
    # What the operator sees: the disagreements with the controller's feedback, the record.
    capsys.readouterr()
    assert main(["shadow", "report", "--since", "1h", "--json", "--config", str(config)]) == 0
    report = json.loads(capsys.readouterr().out)
    by_sha = {c["sha256"]: c for c in report["candidates"]}
    assert by_sha[first]["disagreements"] == sum(
        s["candidate"]["manifest_sha256"] == first for s in snapshots)
    assert by_sha[first]["by_direction"]["candidate_sidelines"]["feedback"] == {
        "confirmed_damage": 1, "false_positive": 1}
    assert (by_sha[first]["candidate_right"], by_sha[first]["production_right"]) == (1, 1)
    assert (report["record"]["candidate_sha256"], report["record"]["items_scored"]) == (
        first, len(now))


def _unreadable(record: ItemRecord) -> ItemRecord:
    """The item with crops the models cannot take (empty images)."""
    return dataclasses.replace(record, crops={
        cam: dataclasses.replace(crop, color=np.zeros((0, 0, 3), np.uint8))
        for cam, crop in record.crops.items()})


def test_offers_never_wait_and_the_record_is_never_older_than_the_counts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offers return at once: past a full queue, or with the node behind, the item is
    skipped and counted. On a slow disk (a write that stalls) the scorer's record write is
    still going when the stop writes the final counts: those land last, never the older
    ones."""
    import edge.pipeline.shadow as shadow_module

    cfg = load_config(None)
    manifest = load_manifest(cfg.models.manifest)
    running = ItemInspector(manifest, open_backend(manifest.model(EMBEDDING), cfg.models),
                            open_backend(manifest.model(DAMAGE), cfg.models),
                            gallery=ReferenceGallery(None), catalogue=load_catalogue(),
                            cfg=cfg.models)  # production's models; the gallery is not needed
    judged = [(r, verdict_for(r, Decision.PASS))
              for r in synthetic_records(4, damage_rate=0.0, seed=4)]
    path = tmp_path / SHADOW_RECORD_FILE
    scorer = ShadowScorer(candidate_manifest(tmp_path / "c", fused_scale=1.0), running,
                          cfg.decision, WallClock(), record_path=path, max_queue=2,
                          max_batch=cfg.models.max_batch, node_id="edge-01", line_id="line-1")
    assert scorer.reload() is None
    write, stalled = shadow_module.write_shadow_record, threading.Event()

    def slow_write(where: Path, record: ShadowRecord) -> None:
        if record.items_scored == 1 and not stalled.is_set():
            stalled.set()
            time.sleep(0.6)
        write(where, record)

    monkeypatch.setattr(shadow_module, "write_shadow_record", slow_write)
    monkeypatch.setattr(shadow_module, "RECORD_EVERY_S", 0.0)  # after every item
    node = {"queued": 0, "deciding": True}
    scorer.attach(lambda _: True, queued=lambda: node["queued"],
                  deciding=lambda: node["deciding"])
    scorer.start()
    try:
        waits = []

        def offer(i: int) -> None:
            t0 = time.perf_counter()
            scorer.offer(*judged[i])
            waits.append(time.perf_counter() - t0)

        offer(0)
        assert wait_until(lambda: scorer.snapshot()[3] == 0, 5.0)  # taken; production first
        offer(1)
        offer(2)
        offer(3)  # past the full queue
        node["queued"] = cfg.models.max_batch
        offer(3)  # the node is behind
        assert max(waits) < 0.01
        node["queued"], node["deciding"] = 0, False
        assert stalled.wait(10.0)  # the first item scored, its record slowly on its way
        node["queued"] = cfg.models.max_batch
        offer(3)
    finally:
        scorer.stop(timeout_s=0.4)
        running.close()
    assert wait_until(lambda: not scorer.worker_up, 5.0)  # its slow write done too
    _, tally, counters, _ = scorer.snapshot()
    assert counters.skipped == {"queue_full": 1, "behind": 2, "shutdown": 2}
    record = load_shadow_record(path)
    assert record is not None
    assert (record.items_scored, record.items_skipped) == (tally.scored, tally.skipped) == (1, 5)


def test_a_candidate_counts_on_from_its_own_record_and_directions_follow_from_it(
        tmp_path: Path) -> None:
    """A restart (or a reload of the same manifest) counts on from the record of the same
    candidate, never from another's; the disagreements by direction, which the record does
    not hold, follow from its sideline counts. A record written before failures were kept
    still loads (none failed)."""
    tally = ShadowTally()
    for production, candidate in ((Decision.PASS, Decision.SIDELINE),) * 3 + (
            (Decision.SIDELINE, Decision.PASS),) * 2 + ((Decision.PASS, Decision.PASS),) * 5 + (
            (Decision.SIDELINE, Decision.SIDELINE),):
        tally.count(production, candidate)
    tally.skipped, tally.failed = 4, 2
    assert tally.disagreements() == {"candidate_sidelines": 3, "candidate_passes": 2}
    record = ShadowRecord("v2", "a" * 64, tally.scored, tally.skipped, tally.agreements,
                          tally.sidelined_candidate, tally.sidelined_production, 1.0,
                          tally.failed)
    resumed = ShadowTally.resumed(record, "a" * 64)
    assert resumed == tally
    assert resumed.disagreements() == tally.disagreements()
    assert ShadowTally.resumed(record, "b" * 64) == ShadowTally()
    assert ShadowTally.resumed(None, "a" * 64) == ShadowTally()
    older = tmp_path / "record.json"
    older.write_text(json.dumps({k: v for k, v in dataclasses.asdict(record).items()
                                 if k != "items_failed"}))
    loaded = load_shadow_record(older)
    assert loaded is not None
    assert (loaded.items_scored, loaded.items_failed) == (tally.scored, 0)
