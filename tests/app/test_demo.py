"""`edge-node demo`'s summary: what the node published, and what its consumers received."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edge.app.demo import DemoOptions, run_demo
from edge.config import load_config
from edge.publish.broker import MosquittoBroker
from tests.publish.helpers import Collector


@pytest.mark.slow
def test_summary_counts_what_the_node_published_and_nothing_is_lost_across_broker_restarts(
        tmp_path: Path, mosquitto_factory: Callable[..., MosquittoBroker]) -> None:
    """With the broker restarted twice mid-run, `verdicts_published` is the node's own count,
    and the simulated controller (the reference consumer) received every one of them, as did
    an independent persistent subscriber: same (node_id, seq) set, nothing lost. (Restarts,
    not SIGKILLs: a killed broker can lose what it acknowledged but had not yet saved, which
    is the broker's durability, not the node's or the controller's: tests/publish covers the
    node's side of crashes.)"""
    broker = mosquitto_factory(persistence=True)
    independent = Collector(broker, "+/+/+/verdict", client_id="test-independent")
    time.sleep(1.2)  # one autosave: the restarted broker still knows the durable subscriber
    base = load_config(None)
    base = dataclasses.replace(base, belt=dataclasses.replace(base.belt, induct_to_camera_m=1.0))
    opts = DemoOptions(seconds=14.0, items_per_second=3.0, seed=5, broker=broker.url,
                       quiet=True, summary_json=tmp_path / "summary.json")
    result: dict[str, object] = {}
    demo = threading.Thread(target=lambda: result.update(run_demo(base, opts)))
    demo.start()
    try:
        for count in (3, 10):
            assert independent.wait_for(
                lambda msgs, n=count: len({m.json()["seq"] for m in msgs}) >= n, 90)
            broker.stop()
            time.sleep(0.5)  # the node decides on while the broker is down
            broker.start()
        demo.join(90)
        assert not demo.is_alive()
    finally:
        demo.join(30)
    published = result["verdicts_published"]
    assert isinstance(published, int)
    assert published >= 12, result
    assert result["verdicts_acked"] == published, result
    assert independent.wait_for(
        lambda msgs: len({m.json()["seq"] for m in msgs}) >= published, 20)
    received = {(m.json()["node_id"], m.json()["seq"]) for m in independent.on("/verdict")}
    assert len(received) == published, (sorted(received), published)
    assert result["verdicts_received_by_controller"] == published, result
    assert json.loads((tmp_path / "summary.json").read_text())["verdicts_published"] == published
