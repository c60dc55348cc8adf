"""`edge-node shadow report`: the shadow disagreements in the snapshot store, by direction, with
who was right where the controller's feedback came."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge.audit.files import read_sidecar
from edge.audit.shadow_record import SHADOW_RECORD_FILE, ShadowRecord, write_shadow_record
from edge.audit.store import SnapshotStore
from edge.commands.main import main
from edge.commands.shadow import shadow_report
from edge.config import config_to_mapping, load_config
from edge.types import Decision
from tests.audit.helpers import synthetic_records, verdict_for


def _report(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    capsys.readouterr()
    assert main(["shadow", "report", "--since", "1h", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def _block(direction: str, sha: str) -> dict[str, Any]:
    """A shadow block as the scorer writes it (`edge.pipeline.shadow`)."""
    return {"disagreement": direction, "candidate": {"decision": "sideline"},
            "candidate_manifest": {"path": "/c/manifest.yaml", "version": "v2-cand",
                                   "sha256": sha}}


def test_the_report_counts_disagreements_with_the_feedback_and_the_record(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Disagreement snapshots in a real snapshot store, feedback on some of them: the report
    finds every disagreement since `--since` (an older one is left out, a snapshot without a
    shadow block is not one), counts the controller's feedback (confirmed damage: the
    candidate was right; a false positive: production was), and, with the node's config,
    shows the shadow record; a `--dir` that is not there is a usage error (exit 2). (Over a
    node's own run: tests/pipeline/test_shadow.py.)"""
    cfg = load_config(None)
    state = tmp_path / "state"
    cfg = dataclasses.replace(cfg, storage=dataclasses.replace(
        cfg.storage, state_dir=state, snapshot_pass_sample=0.0, snapshots_min_free_mb=0.0))
    store = SnapshotStore(state / "snapshots", cfg.storage)
    sha = "c" * 64
    records = synthetic_records(5, damage_rate=0.0, seed=6)
    store.start()
    try:
        for record in records[:4]:
            assert store.offer_shadow(record, verdict_for(record, Decision.PASS),
                                      _block("candidate_sidelines", sha))
            assert store.flush(10.0)  # one at a time: production's snapshots come first
        assert store.offer(records[4], verdict_for(records[4], Decision.SIDELINE)).snapshot_id
        assert store.label(records[0].item_id, "confirmed_damage")
        assert store.label(records[1].item_id, "false_positive")
        assert store.flush(10.0)
    finally:
        store.close()
    shadowed = [d for d in sorted((state / "snapshots").iterdir()) if read_sidecar(d).get("shadow")]
    assert len(shadowed) == 4
    shutil.copytree(shadowed[0], state / "snapshots" / "20200101T000000000-0000-000001")
    write_shadow_record(state / SHADOW_RECORD_FILE, ShadowRecord(
        "v2-cand", sha, 50, 3, 46, 6, 2, 1.7e12, 1))

    report = _report(capsys, "--dir", str(state / "snapshots"))
    assert report["record"] is None
    [entry] = report["candidates"]
    assert (entry["sha256"], entry["version"], entry["disagreements"]) == (sha, "v2-cand", 4)
    assert entry["by_direction"]["candidate_sidelines"] == {
        "items": 4, "feedback": {"confirmed_damage": 1, "false_positive": 1},
        "candidate_right": 1, "production_right": 1, "unreviewed": 2}
    assert entry["by_direction"]["candidate_passes"]["items"] == 0

    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump(config_to_mapping(cfg)))
    report = _report(capsys, "--config", str(config))
    assert report["candidates"] == [entry]
    assert (report["record"]["candidate_sha256"], report["record"]["items_scored"],
            report["record"]["items_failed"], report["record"]["agreement"]) == (
        sha, 50, 1, 0.92)
    assert main(["shadow", "report", "--since", "1h", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert "4 disagreements; right: candidate 1, production 1" in text
    assert "50 scored, 1 failed, 3 skipped" in text
    assert main(["shadow", "report", "--since", "1h", "--dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edge-node: config key '--dir'"), err


@pytest.mark.parametrize(("direction", "kind", "right"), [
    ("candidate_sidelines", "confirmed_damage", "candidate_right"),
    ("candidate_sidelines", "false_positive", "production_right"),
    ("candidate_sidelines", "packaging_changed", "production_right"),
    ("candidate_passes", "confirmed_damage", "production_right"),
    ("candidate_passes", "false_positive", "candidate_right"),
    ("candidate_passes", "packaging_changed", "candidate_right"),
    ("candidate_passes", None, "unreviewed"),
])
def test_who_was_right_follows_from_the_direction_and_the_feedback(
        direction: str, kind: str | None, right: str) -> None:
    """A candidate that sidelined what production passed was right about confirmed damage
    and wrong about intact items; the other way round for one that passed what production
    sidelined. Sidecars without a shadow block are not counted."""
    manifest = {"version": "v2", "sha256": "c" * 64}
    sidecars = [
        {"verdict": {}, "label": None},
        {"verdict": {}, "shadow": {"disagreement": direction, "candidate_manifest": manifest},
         "label": None if kind is None else {"kind": kind, "received_ms": time.time()}},
    ]
    [entry] = shadow_report(sidecars)
    assert entry[right] == 1
    assert entry["disagreements"] == 1
    assert entry["by_direction"][direction][right] == 1
    assert sum(entry[k] for k in ("candidate_right", "production_right", "unreviewed")) == 1
