"""A site's labelled items from a real snapshot export, the split by item, and `edge-node train`
refusing labels that are too few or too one-sided (before it loads torch)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edge.audit.files import SIDECAR
from edge.audit.store import SnapshotStore, keep_passed
from edge.commands.main import main
from edge.commands.snapshots import export_snapshots
from edge.config import StorageConfig
from edge.training.site_data import MIN_HELDOUT_DAMAGED, SiteItem, load_export, split_by_item
from tests.training.helpers import (
    Row,
    fast_dir,
    ids_on_side,
    make_export,
    site_record,
    site_verdict,
)


@pytest.fixture
def store_dir(tmp_path: Path) -> Iterator[Path]:
    with fast_dir(tmp_path) as folder:
        yield folder


def test_labels_follow_feedback_and_uncontradicted_sampled_passes(store_dir: Path) -> None:
    """confirmed_damage is damaged (on a pass too: a miss found in the audit); false_positive
    and packaging_changed are intact; a sampled pass nobody contradicted is intact; a
    sidelined item nobody reviewed is left out. The crops come back as the node wrote them:
    heights as the models saw them (from the PNG's 0.1 mm steps for snapshots without the
    replay arrays), the view without depth marked so, the measured box from the sidecar."""
    rows: list[Row] = [("sideline", "confirmed_damage"), ("sideline", "false_positive"),
                       ("sideline", "packaging_changed"), ("pass", None),
                       ("pass", "confirmed_damage"), ("sideline", None)]
    export = make_export(store_dir, rows)
    data = load_export(export)
    got = {i.record.item_id: (i.label, i.source, i.decision) for i in data.items}
    assert got == {"ITEM-00000": ("damaged", "confirmed_damage", "sideline"),
                   "ITEM-00001": ("intact", "false_positive", "sideline"),
                   "ITEM-00002": ("intact", "packaging_changed", "sideline"),
                   "ITEM-00003": ("intact", "pass", "pass"),
                   "ITEM-00004": ("damaged", "confirmed_damage", "pass")}
    assert data.skipped == {"unreviewed_sideline": 1}
    assert data.counts() == {"damaged": 2, "intact": 3}
    item = data.items[0].record
    expected = site_record("ITEM-00000", np.random.default_rng(0))
    top = item.crops["top"]
    assert np.array_equal(top.color, expected.crops["top"].color)
    assert np.array_equal(top.height_mm, expected.crops["top"].height_mm)  # as judged
    assert top.has_depth
    assert not item.crops["angled"].has_depth
    assert item.box_mm == (200.0, 150.0, 98.5)
    assert item.truth is None  # labels only: a site has no ground truth
    for arrays in export.glob("*/replay.npz"):  # snapshots from before heights were kept
        arrays.unlink()
    older = load_export(export).items[0].record.crops["top"]
    assert np.abs(older.height_mm - top.height_mm).max() <= 0.051  # the PNG's 0.1 mm steps


def test_a_pass_kept_only_for_a_shadow_disagreement_is_no_intact_label(store_dir: Path) -> None:
    """A pass the sample kept and nobody contradicted is an intact label. A pass kept only
    because the shadow candidate disagreed (outside the sample: nobody was due to audit it)
    is not: it is counted apart, and labelled only by feedback. The export line says why
    each snapshot was kept, from its sidecar on disk; for snapshots from before the sidecar
    said so, a passed one with a shadow block is left out (either could have kept it)."""
    sample = 0.5
    candidates = [f"ITEM-{n:05d}" for n in range(40)]
    sampled = [i for i in candidates if keep_passed(i, sample)][:1]
    unsampled = [i for i in candidates if not keep_passed(i, sample)][:2]
    rng = np.random.default_rng(1)
    store = SnapshotStore(store_dir / "snapshots", dataclasses.replace(
        StorageConfig(state_dir=store_dir), snapshot_pass_sample=sample,
        snapshots_min_free_mb=0.0))
    store.start()
    block = {"disagreement": "candidate_sidelines", "candidate": {"decision": "sideline"}}
    for item_id in [*sampled, *unsampled]:
        record = site_record(item_id, rng)
        verdict = store.offer(record, site_verdict(record, "pass"))
        assert (verdict.snapshot_id is not None) == (item_id in sampled)
        if verdict.snapshot_id is None:
            assert store.offer_shadow(record, verdict, block) is not None
    sidelined = site_record("ITEM-SIDE", rng)
    side = store.offer(sidelined, site_verdict(sidelined, "sideline"))
    assert store.offer_shadow(sidelined, side, {**block, "disagreement": "candidate_passes"})
    assert store.label(unsampled[1], "confirmed_damage")  # a miss the shadow showed
    assert store.label("ITEM-SIDE", "false_positive")
    store.close(timeout_s=30.0)

    export = store_dir / "export"
    export_snapshots(store_dir / "snapshots", export, 0.0)
    lines = {x["item_id"]: x for x in map(json.loads,
                                          (export / "index.jsonl").read_text().splitlines())}
    assert {k: v["kept_for"] for k, v in lines.items()} == {
        sampled[0]: "pass_sample", unsampled[0]: "shadow_only", unsampled[1]: "shadow_only",
        "ITEM-SIDE": "sideline"}
    data = load_export(export)
    assert {i.item_id: (i.label, i.source) for i in data.items} == {
        sampled[0]: ("intact", "pass"), unsampled[1]: ("damaged", "confirmed_damage"),
        "ITEM-SIDE": ("intact", "false_positive")}
    assert data.skipped == {"unreviewed_shadow": 1}

    for item_id in (sampled[0], unsampled[0]):  # as snapshots from before kept_for
        sidecar = store_dir / "snapshots" / lines[item_id]["snapshot_id"] / SIDECAR
        old = json.loads(sidecar.read_text())
        del old["kept_for"]
        sidecar.write_text(json.dumps(old))
    older = store_dir / "older"
    export_snapshots(store_dir / "snapshots", older, 0.0)
    data = load_export(older)
    assert {i.item_id for i in data.items} == {sampled[0], unsampled[1], "ITEM-SIDE"}
    assert data.skipped == {"unreviewed_pass_unmarked": 1}


def test_split_is_by_item_stable_and_not_tied_to_the_pass_sample() -> None:
    """Each item lands on one side by its ID, the same on every run, about 30 % held out;
    the passes the snapshot store samples (crc32 of the ID) spread over both sides."""
    items = [SiteItem(site_record(f"SYN0007-{n:06d}", np.random.default_rng(n)), "intact", "pass",
                      "pass") for n in range(1500)]
    first, again = split_by_item(items), split_by_item(list(reversed(items)))
    held = {i.record.item_id for i in first.held_out}
    assert held == {i.record.item_id for i in again.held_out}
    assert held.isdisjoint(i.record.item_id for i in first.train)
    assert 0.26 < len(held) / len(items) < 0.34
    sampled = [i.record.item_id for i in items if keep_passed(i.record.item_id, 0.2)]
    share = sum(s in held for s in sampled) / len(sampled)
    assert 0.2 < share < 0.4


@pytest.mark.parametrize(("damaged", "intact", "held_damaged", "says"), [
    (12, 60, None, "12 damaged and 60 intact labelled items; fine-tuning needs at least 20 "
                   "damaged and 50 intact"),
    (0, 60, None, "0 damaged and 60 intact"),
    (25, 55, MIN_HELDOUT_DAMAGED - 1, "the held-out split (30% of the items, by item ID) has 4 "
                                      "damaged"),
    (20, 60, 20, "the training split (70% of the items, by item ID) holds only intact items "
                 "(0 damaged, 30 intact); fine-tuning needs at least 1 of each there"),
])
def test_train_refuses_too_few_or_one_sided_labels(
        store_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damaged: int,
        intact: int,
        held_damaged: int | None, says: str) -> None:
    """Exit 2 with the minimum stated, and no candidate folder: too few damaged or intact
    items, only one class, a held-out split without enough damaged items to judge on, or a
    training split without any."""
    rows: list[Row] = [("sideline", "confirmed_damage")] * damaged + [("pass", None)] * intact
    ids = None
    if held_damaged is not None:
        ids = (ids_on_side(held_damaged, True, 0) + ids_on_side(damaged - held_damaged, False, 0)
               + ids_on_side(intact, True, 50_000)[: intact // 2]
               + ids_on_side(intact - intact // 2, False, 50_000))
    export = make_export(store_dir, rows, ids)
    out = tmp_path / "candidate"
    assert main(["train", "--data", str(export), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert says in err
    assert "edge-node train: " in err
    assert not out.exists()


def test_train_refuses_to_write_over_a_folder(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A non-empty --out is never written into (the candidate is renamed into place whole):
    exit 2 before the export is even read."""
    out = tmp_path / "candidate"
    out.mkdir()
    (out / "manifest.yaml").write_text("models of before\n")
    assert main(["train", "--data", str(tmp_path / "no-export"), "--out", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (out / "manifest.yaml").read_text() == "models of before\n"


@pytest.mark.parametrize(("option", "value"), [
    ("--target-fpr", "0.5"), ("--target-fpr", "0"), ("--threads", "0"), ("--lr", "0"),
    ("--lr", "-0.001"), ("--epochs", "0"), ("--synthetic", "-1"), ("--held-out", "0.9"),
    ("--gallery", "no-such-gallery"),
])
def test_train_refuses_options_it_cannot_use(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             option: str, value: str) -> None:
    """A value training cannot use is refused before anything is read or written: exit 2,
    the option named, no candidate folder."""
    out = tmp_path / "candidate"
    given = str(tmp_path / value) if option == "--gallery" else value
    assert main(["train", "--data", str(tmp_path / "no-export"), "--out", str(out), option,
                 given]) == 2
    err = capsys.readouterr().err
    assert f"'{option}'" in err
    assert err.count("\n") == 1  # one line, no traceback
    assert not out.exists()
