"""A site's labelled items from a real snapshot export, the split by item, and `edge-node train`
refusing labels that are too few or too one-sided (before it loads torch)."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from edge.audit.store import SnapshotStore, keep_passed
from edge.commands.main import main
from edge.commands.snapshots import export_snapshots
from edge.config import StorageConfig
from edge.training.site_data import (
    MIN_HELDOUT_DAMAGED,
    SiteItem,
    item_bucket,
    load_export,
    split_by_item,
)
from edge.types import Decision, ItemCrop, ItemRecord, Reason, Scores, Verdict

#: (decision, feedback) of one exported item
Row = tuple[str, str | None]
SHM = Path("/dev/shm")


@pytest.fixture
def store_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder for snapshot stores: on tmpfs where there is one (each snapshot is fsynced
    file by file, which the disk makes slow and these tests do not measure)."""
    if not SHM.is_dir():
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir=SHM, prefix="cv-test-site-") as tmp:
        yield Path(tmp)


def _record(item_id: str, rng: np.random.Generator) -> ItemRecord:
    def crop(cam: str, depth: bool) -> ItemCrop:
        height = np.zeros((64, 64), np.float32)
        height[8:56, 8:56] = rng.uniform(40.0, 90.0)
        return ItemCrop(cam, rng.integers(0, 255, (64, 64, 3), dtype=np.uint8),
                        height if depth else np.zeros_like(height), height > 0,
                        has_depth=depth)

    return ItemRecord(track_id=1, item_id=item_id, product_id="P-BOX-S", first_seen_ms=0.0,
                      captured_ms=1.0, deadline_ms=5000.0, box_mm=(200.0, 150.0, 98.5),
                      centre_mm=(0.0, 0.0),
                      crops={"top": crop("top", True), "angled": crop("angled", False)})


def _verdict(record: ItemRecord, decision: str) -> Verdict:
    side = decision == "sideline"
    return Verdict(item_id=record.item_id, product_id=record.product_id,
                   decision=Decision(decision), reasons=(Reason.DAMAGE,) if side else (),
                   scores=Scores(0.9 if side else 0.01, None, 0.1, 0.9 if side else 0.01),
                   threshold_version="t1", model_versions={"damage": "1"}, findings=(),
                   captured_ms=1.0, decided_ms=2.0, deadline_ms=5000.0)


def make_export(folder: Path, rows: Sequence[Row], ids: Sequence[str] | None = None) -> Path:
    """Snapshots kept by the node's store, labelled by feedback, exported as operators do."""
    rng = np.random.default_rng(0)
    store = SnapshotStore(folder / "snapshots", dataclasses.replace(
        StorageConfig(state_dir=folder), snapshot_pass_sample=1.0, snapshots_min_free_mb=0.0),
        queue_size=2 * len(rows) + 1)
    store.start()
    for n, (decision, feedback) in enumerate(rows):
        record = _record(ids[n] if ids else f"ITEM-{n:05d}", rng)
        store.offer(record, _verdict(record, decision))
        if feedback is not None:
            assert store.label(record.item_id, feedback)
    store.close(timeout_s=60.0)
    export_snapshots(folder / "snapshots", folder / "export", 0.0)
    return folder / "export"


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
    expected = _record("ITEM-00000", np.random.default_rng(0))
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


def test_split_is_by_item_stable_and_not_tied_to_the_pass_sample() -> None:
    """Each item lands on one side by its ID, the same on every run, about 30 % held out;
    the passes the snapshot store samples (crc32 of the ID) spread over both sides."""
    items = [SiteItem(_record(f"SYN0007-{n:06d}", np.random.default_rng(n)), "intact", "pass",
                      "pass") for n in range(1500)]
    first, again = split_by_item(items), split_by_item(list(reversed(items)))
    held = {i.record.item_id for i in first.held_out}
    assert held == {i.record.item_id for i in again.held_out}
    assert held.isdisjoint(i.record.item_id for i in first.train)
    assert 0.26 < len(held) / len(items) < 0.34
    sampled = [i.record.item_id for i in items if keep_passed(i.record.item_id, 0.2)]
    share = sum(s in held for s in sampled) / len(sampled)
    assert 0.2 < share < 0.4


def _ids(count: int, held_out: bool, start: int) -> list[str]:
    """`count` item IDs that the split holds out (or keeps for training)."""
    out: list[str] = []
    n = start
    while len(out) < count:
        item_id = f"ITEM-{n:05d}"
        if (item_bucket(item_id) < 0.3) == held_out:
            out.append(item_id)
        n += 1
    return out


@pytest.mark.parametrize(("damaged", "intact", "held_damaged", "says"), [
    (12, 60, None, "12 damaged and 60 intact labelled items; fine-tuning needs at least 20 "
                   "damaged and 50 intact"),
    (0, 60, None, "0 damaged and 60 intact"),
    (25, 55, MIN_HELDOUT_DAMAGED - 1, "the held-out split (30% of the items, by item ID) has 4 "
                                      "damaged"),
])
def test_train_refuses_too_few_or_one_sided_labels(
        store_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damaged: int,
        intact: int,
        held_damaged: int | None, says: str) -> None:
    """Exit 2 with the minimum stated, and no candidate folder: too few damaged or intact
    items, only one class, or a held-out split without enough damaged items to judge on."""
    rows: list[Row] = [("sideline", "confirmed_damage")] * damaged + [("pass", None)] * intact
    ids = None
    if held_damaged is not None:
        ids = (_ids(held_damaged, True, 0) + _ids(damaged - held_damaged, False, 0)
               + _ids(intact, True, 50_000)[: intact // 2]
               + _ids(intact - intact // 2, False, 50_000))
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
