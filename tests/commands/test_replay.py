"""`edge-node replay` over a synthetic demo run: the stored manifest reproduces every item,
a candidate shows what it would have decided.

The demo and the replays run as `edge-node` processes, as an operator runs them: with the
process settings of the node (one BLAS thread), which the bit-for-bit comparison needs.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import pytest
import yaml

from edge.audit.files import SIDECAR, read_sidecar
from edge.catalogue import load_catalogue
from edge.commands.main import main
from edge.commands.replay import snapshot_dirs
from edge.config import config_to_mapping, load_config
from edge.infer.inspector import ItemInspector
from tests.audit.candidates import candidate_manifest
from tests.conftest import LONG_CHECKS

#: Items the demo must judge: 200 with CV_LONG_CHECKS=1 (tools/long_checks.sh).
ITEMS = 200 if LONG_CHECKS else 16


@dataclasses.dataclass(frozen=True)
class DemoRun:
    snapshots: Path
    candidate: Path
    summary: dict[str, Any]

    def sidecars(self) -> dict[str, dict[str, Any]]:
        return {d.name: read_sidecar(d) for d in sorted(self.snapshots.iterdir())
                if (d / SIDECAR).is_file()}


def _cli(*args: str, timeout: float = 240.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """`edge-node demo` keeping every item (snapshot_pass_sample 1.0), with a candidate in
    shadow whose fused thresholds are a thousandth of production's; a fast belt with a long way
    to the divert, so that items are soon seen and judged in time, ~4 a second: as many as
    the snapshot writer keeps up with."""
    tmp = tmp_path_factory.mktemp("replay-demo")
    candidate = candidate_manifest(tmp / "candidate", fused_scale=0.001)
    cfg = load_config(None)
    cfg = dataclasses.replace(
        cfg, belt=dataclasses.replace(cfg.belt, speed_mps=2.4, induct_to_camera_m=1.0,
                                      camera_to_divert_m=6.0),
        storage=dataclasses.replace(cfg.storage, snapshot_pass_sample=1.0,
                                    snapshots_min_free_mb=0.0),
        models=dataclasses.replace(cfg.models, shadow=dataclasses.replace(
            cfg.models.shadow, manifest=candidate)))
    config = tmp / "demo.yaml"
    config.write_text(yaml.safe_dump(config_to_mapping(cfg)))
    # The last ~3 s are announced no more (travel time to the divert).
    seconds = 4.0 + ITEMS / 3.3
    proc = _cli("demo", "--config", str(config), "--seconds", f"{seconds:.0f}",
                "--items-per-second", "4", "--seed", "7", "--damage-rate", "0.2", "--quiet",
                "--snapshots-dir", str(tmp / "snapshots"), "--summary-json",
                str(tmp / "summary.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp / "summary.json").read_text())
    return DemoRun(tmp / "snapshots", candidate, summary)


def test_the_stored_manifest_reproduces_every_item_bit_for_bit(
        demo_run: DemoRun, tmp_path: Path) -> None:
    """Every item the models judged in the demo has a snapshot, and replay with the same
    manifest gives back its every score (exact float equality), decision, reasons and
    findings. A copy whose stored fused score was changed in the last bit is the one
    difference found (exit 1); a snapshot without replay data is listed, not replayed."""
    sidecars = demo_run.sidecars()
    judged = {sid for sid, s in sidecars.items() if s["verdict"]["scores"] is not None}
    reasons = demo_run.summary["reasons"]
    fail_safe = reasons.get("timeout", 0) + reasons.get("not_seen", 0)
    assert len(judged) >= max(ITEMS, demo_run.summary["actuation_verdicts"] - fail_safe)
    decisions = Counter(sidecars[sid]["verdict"]["decision"] for sid in judged)
    assert decisions["pass"] > 0, decisions
    assert decisions["sideline"] > 0, decisions

    folder = tmp_path / "folder"
    folder.mkdir()
    for sid in sidecars:
        (folder / sid).symlink_to(demo_run.snapshots / sid)
    victim = sorted(judged)[len(judged) // 2]
    tampered = folder / f"{victim}-tampered"
    shutil.copytree(demo_run.snapshots / victim, tampered)
    data = json.loads((tampered / SIDECAR).read_text())
    fused = data["verdict"]["scores"]["fused"]
    data["verdict"]["scores"]["fused"] = float(fused + abs(fused) * 2**-52 + 5e-324)
    (tampered / SIDECAR).write_text(json.dumps(data))
    old = folder / "20260101T000000000-0000-000001"
    shutil.copytree(demo_run.snapshots / victim, old)
    data = json.loads((old / SIDECAR).read_text())
    del data["replay"]
    (old / SIDECAR).write_text(json.dumps(data))

    proc = _cli("replay", str(folder), "--json")
    assert proc.returncode == 1, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    items = {i["snapshot_id"]: i for i in out["items"]}
    assert set(items) == judged | {victim}  # the tampered copy carries the victim's ID
    differing = [i for i in out["items"] if not i["same"]]
    assert [(i["snapshot_id"], i["differs"]) for i in differing] == [(victim, ["scores"])]
    for sid in judged:
        stored = sidecars[sid]["verdict"]
        replayed = next(i for i in out["items"] if i["snapshot_id"] == sid and i["same"])
        assert replayed["mode"] == "reproduce"
        for key in ("decision", "reasons", "scores", "findings", "threshold_version"):
            assert replayed["replayed"][key] == stored[key], (sid, key)
    summary = out["summary"]
    assert summary["same_manifest"] == {"items": len(judged) + 1, "reproduced": len(judged),
                                        "differing": 1, "not_comparable": 0}
    assert [e["snapshot"] for e in summary["not_replayable"]] == [old.name]
    assert "without replay data" in summary["not_replayable"][0]["why"]


def test_differences_with_a_known_cause_are_not_comparable_and_others_still_count(
        demo_run: DemoRun, tmp_path: Path) -> None:
    """Against a node's gallery folder (banks read back as float16, where the demo's node
    scored against the float32 banks it embedded), with one bank that learned a view since:
    the items of that bank are not comparable (its views differ), the others not comparable
    either (judged against the shipped references in memory they come out the same), none
    sets exit 1; the copy whose stored fused score was changed in the last bit still
    differs (exit 1)."""
    sidecars = demo_run.sidecars()
    every = sorted(sid for sid, s in sidecars.items() if s["verdict"]["scores"] is not None)
    victim = every[len(every) // 2]
    product = lambda sid: sidecars[sid]["verdict"]["product_id"]  # noqa: E731
    learner = next(sid for sid in every if product(sid) not in (None, product(victim)))
    # A few items of other products besides: a smaller replay, the same cases.
    judged = sorted({victim, learner, *[sid for sid in every if product(sid) not in (
        product(victim), product(learner))][:3], *[sid for sid in every
                                                  if product(sid) == product(learner)]})
    camera = sorted(sidecars[learner]["views"])[0]
    gallery = tmp_path / "gallery"
    models = dataclasses.replace(load_config(None).models, gallery_dir=gallery)
    inspector = ItemInspector.load(models, load_catalogue())  # seeds and writes the folder
    try:
        view = cv2.imread(str(demo_run.snapshots / learner / f"{camera}_color.png"))
        inspector.learn_views(product(learner), camera, [view])
    finally:
        inspector.close()
    folder = tmp_path / "folder"
    folder.mkdir()
    for sid in judged:
        (folder / sid).symlink_to(demo_run.snapshots / sid)
    tampered = folder / f"{victim}-tampered"
    shutil.copytree(demo_run.snapshots / victim, tampered)
    data = json.loads((tampered / SIDECAR).read_text())
    fused = data["verdict"]["scores"]["fused"]
    data["verdict"]["scores"]["fused"] = float(fused + abs(fused) * 2**-52 + 5e-324)
    (tampered / SIDECAR).write_text(json.dumps(data))

    proc = _cli("replay", str(folder), "--gallery", str(gallery), "--json")
    assert proc.returncode == 1, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    differing = [i for i in out["items"] if not i["same"] and i["not_comparable"] is None]
    assert [i["snapshot_id"] for i in differing] == [victim]
    assert "scores" in differing[0]["differs"]
    reasons = {i["snapshot_id"]: i["not_comparable"] for i in out["items"]
               if i["not_comparable"] is not None}
    learned = {sid for sid in judged if product(sid) == product(learner)
               and camera in sidecars[sid]["views"]}
    assert learned <= set(reasons)
    for sid, why in reasons.items():
        assert ("views for the node" in why) == (sid in learned), (sid, why)
        if sid not in learned:
            assert "embedded in memory (float32)" in why, why
    assert set(reasons) - learned, "no item of another product was judged against a bank"
    same = out["summary"]["same_manifest"]
    assert same["items"] == len(judged) + 1
    assert (same["differing"], same["not_comparable"]) == (1, len(reasons))
    assert same["reproduced"] == len(judged) - len(reasons)


def test_a_candidate_is_shown_beside_the_stored_verdicts_as_the_shadow_scorer_saw_it(
        demo_run: DemoRun) -> None:
    """Replay with the candidate manifest (exit 0): for every shadow disagreement the demo
    kept, the replayed verdict is the candidate's verdict in the snapshot's shadow block,
    bit for bit; every changed decision goes the way lower thresholds push it, and the
    summary counts them by the reasons of the sidelining verdict."""
    sidecars = demo_run.sidecars()
    proc = _cli("replay", str(demo_run.snapshots), "--manifest", str(demo_run.candidate),
                "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    items = {i["snapshot_id"]: i for i in out["items"]}
    assert {i["mode"] for i in items.values()} == {"compare"}
    shadowed = {sid: s["shadow"] for sid, s in sidecars.items() if s.get("shadow")}
    assert shadowed, "the candidate never disagreed: pick a lower fused_scale"
    for sid, shadow in shadowed.items():
        assert shadow["disagreement"] == "candidate_sidelines"
        replayed = items[sid]["replayed"]
        for key in ("decision", "reasons", "scores", "findings", "threshold_version"):
            assert replayed[key] == shadow["candidate"][key], (sid, key)
        assert items[sid]["stored"]["decision"] == sidecars[sid]["verdict"]["decision"]
    changed = {sid: i for sid, i in items.items() if i["decision_change"]}
    assert set(shadowed) <= set(changed)
    assert {i["decision_change"] for i in changed.values()} == {"pass->sideline"}
    by_reason = Counter(r for i in changed.values() for r in i["replayed"]["reasons"])
    summary = out["summary"]
    assert summary["decisions_changed"] == {"pass->sideline": dict(sorted(by_reason.items()))}
    assert summary["other_manifest"] == {"items": len(items), "decisions_changed": len(changed)}
    assert summary["same_manifest"]["items"] == 0


def test_a_snapshot_id_is_found_in_the_configured_store_and_bad_targets_exit_2(
        demo_run: DemoRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An ID names a snapshot of `storage.state_dir/snapshots`; an unknown ID, a folder
    without snapshots, a missing manifest or gallery are usage errors (exit 2), said in one
    line."""
    sid = sorted(demo_run.sidecars())[0]
    state = tmp_path / "state"
    shutil.copytree(demo_run.snapshots / sid, state / "snapshots" / sid)
    cfg = dataclasses.replace(load_config(None), storage=dataclasses.replace(
        load_config(None).storage, state_dir=state))
    assert snapshot_dirs(sid, cfg) == [state / "snapshots" / sid]
    assert snapshot_dirs(str(state / "snapshots"), cfg) == [state / "snapshots" / sid]
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump(config_to_mapping(cfg)))
    (tmp_path / "empty").mkdir()
    for args in (["20991231T000000000-ffff-000001", "--config", str(config)],
                 ["not-a-snapshot"], [str(tmp_path / "empty")],
                 [sid, "--config", str(config), "--manifest", str(tmp_path / "none.yaml")],
                 [sid, "--config", str(config), "--gallery", str(tmp_path / "none")]):
        assert main(["replay", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("edge-node: config key"), err
        assert err.count("\n") == 1, err
