"""`/metrics` of a running node: parses as Prometheus text; counters match what was published.

This file runs after the other web tests (it stops new items on the shared node).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.web.conftest import REPO, LiveNode

DASHBOARD = REPO / "tools" / "grafana" / "conveyor-vision-dashboard.json"
SITE_DASHBOARD = REPO / "tools" / "grafana" / "conveyor-vision-site.json"


def _scrape(live_node: LiveNode) -> dict[str, list[tuple[dict[str, str], float]]]:
    code, body, ctype = live_node.get("/metrics")
    assert code == 200
    assert ctype.startswith("text/plain")
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return out


def test_verdict_counters_match_the_verdicts_the_controller_received(
        live_node: LiveNode) -> None:
    """After the belt empties: cv_verdicts_total by decision equals the actuation verdicts the
    controller got over MQTT, and the item accounting adds up."""
    live_node.wait_for("a few verdicts", lambda: live_node.controller.verdict_count() >= 10,
                       90.0)
    live_node.quiesce()
    m = _scrape(live_node)
    published = Counter(str(v["decision"]) for v in live_node.controller.actuations().values())
    counted = {labels["decision"]: value for labels, value in m["cv_verdicts_total"]}
    assert counted == {k: float(n) for k, n in published.items()}
    items = {labels["state"]: value for labels, value in m["cv_items"]}
    assert items["in_flight"] == 0
    assert items["admitted"] == items["passed"] + items["sidelined"] + items["fail_safe"]
    assert counted.get("sideline", 0) > 0
    # Every sideline verdict the models decided carries the ID of a snapshot that is on disk
    # (fail-safe ones, e.g. an item never seen, have no picture to show).
    judged = [v for v in live_node.controller.actuations().values()
              if v["decision"] == "sideline" and not v["fail_safe"]]
    assert judged
    assert live_node.store.flush(10.0)
    for v in judged:
        assert v["snapshot_id"], v
        assert live_node.store.path(str(v["snapshot_id"])) is not None
    assert m["cv_snapshots_saved_total"][0][1] >= len(judged)
    assert m["cv_broker_connected"][0][1] == 1.0
    stats = live_node.node.scheduler.stats()  # misses depend on the CPU; they must add up
    assert m["cv_deadline_misses_total"][0][1] == stats.deadline_misses
    assert m["cv_late_verdicts_total"][0][1] == stats.late
    # Delivery adds up: every verdict handed to MQTT is acknowledged, dropped or still queued.
    mqtt = {labels["outcome"]: value for labels, value in m["cv_mqtt_verdicts_total"]}
    assert mqtt["published"] >= sum(published.values())
    assert mqtt["published"] == (mqtt["acked"] + mqtt["refused"] + mqtt["dropped_expired"]
                                 + mqtt["dropped_actionable"] + m["cv_outbox_depth"][0][1])
    assert mqtt["acks_not_recorded"] == 0


def test_metrics_cover_what_operators_watch(live_node: LiveNode) -> None:
    """Per camera fps and drops, per stage latency histograms, queue depth, outbox depth,
    broker state and model versions are all exposed."""
    m = _scrape(live_node)
    cams = {c.id for c in live_node.cfg.cameras}
    assert {labels["camera"] for labels, _ in m["cv_camera_fps"]} == cams
    assert {labels["camera"] for labels, _ in m["cv_camera_frames_dropped_total"]} == cams
    stages = {labels["stage"] for labels, _ in m["cv_stage_latency_seconds_count"]}
    assert {"sync", "items", "inference"} <= stages
    assert {labels["queue"] for labels, _ in m["cv_queue_depth"]} >= {"frames", "items"}
    assert "cv_outbox_depth" in m
    assert {"cv_sync_late_frames_total", "cv_sync_unmatched_frames_total",
            "cv_mqtt_reconnects_total"} <= set(m)
    assert "cv_capture_to_ack_seconds_bucket" in m
    assert {labels["model"] for labels, _ in m["cv_model_info"]} >= {"damage", "embedding"}
    # Item finding runs in worker processes: how many, how much they did, how often one died.
    assert m["cv_item_workers"][0][1] == live_node.cfg.items.workers
    assert m["cv_item_worker_jobs_total"][0][1] > 0
    assert m["cv_item_worker_respawns_total"][0][1] == 0
    assert m["cv_item_worker_cpu_seconds_total"][0][1] > 0
    # The cameras write depth into the workers' shared memory, and capture reuses buffers.
    assert m["cv_item_worker_depth_shared_total"][0][1] > 0
    assert {labels["camera"] for labels, _ in m["cv_camera_frame_buffers_allocated_total"]} == (
        cams)


@pytest.mark.parametrize(("dashboard_file", "panels"), [(DASHBOARD, 20), (SITE_DASHBOARD, 6)])
def test_grafana_dashboard_only_uses_metrics_the_node_exposes(
        live_node: LiveNode, dashboard_file: Path, panels: int) -> None:
    """Every cv_* series a dashboard panel queries (the node's and the site's) exists in a
    real node's /metrics, cv_node_info included (it ties a node to its line)."""
    dashboard = json.loads(dashboard_file.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= panels
    _, body, _ = live_node.get("/metrics")
    families = list(text_string_to_metric_families(body.decode("utf-8")))
    # A family without samples yet (e.g. no calibrated camera) still counts as exposed.
    names = ({f.name for f in families} | {s.name for f in families for s in f.samples}
             | {f.name + "_total" for f in families if f.type == "counter"})
    used = {n for e in exprs for n in re.findall(r"\bcv_[a-z_]+", e)}
    assert used
    assert used <= names, sorted(used - names)
