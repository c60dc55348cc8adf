"""Labelled site snapshots, kept by the node's real snapshot store and exported as operators
export them, for the site-training tests."""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from edge.audit.store import SnapshotStore
from edge.commands.snapshots import export_snapshots
from edge.config import StorageConfig
from edge.training.site_data import item_bucket
from edge.types import Decision, ItemCrop, ItemRecord, Reason, Scores, Verdict

#: (decision, feedback) of one exported item
Row = tuple[str, str | None]
SHM = Path("/dev/shm")


@contextlib.contextmanager
def fast_dir(fallback: Path) -> Iterator[Path]:
    """A folder for snapshot stores: on tmpfs where there is one (each snapshot is fsynced
    file by file, which the disk makes slow and these tests do not measure)."""
    if not SHM.is_dir():
        yield fallback
        return
    with tempfile.TemporaryDirectory(dir=SHM, prefix="cv-test-site-") as tmp:
        yield Path(tmp)


def site_record(item_id: str, rng: np.random.Generator, product: str = "P-BOX-S"
                ) -> ItemRecord:
    """An item as the node cut it out: a top view with depth, an angled one without."""
    def crop(cam: str, depth: bool) -> ItemCrop:
        height = np.zeros((64, 64), np.float32)
        height[8:56, 8:56] = rng.uniform(40.0, 90.0)
        return ItemCrop(cam, rng.integers(0, 255, (64, 64, 3), dtype=np.uint8),
                        height if depth else np.zeros_like(height), height > 0,
                        has_depth=depth)

    return ItemRecord(track_id=1, item_id=item_id, product_id=product, first_seen_ms=0.0,
                      captured_ms=1.0, deadline_ms=5000.0, box_mm=(200.0, 150.0, 98.5),
                      centre_mm=(0.0, 0.0),
                      crops={"top": crop("top", True), "angled": crop("angled", False)})


def site_verdict(record: ItemRecord, decision: str) -> Verdict:
    side = decision == "sideline"
    return Verdict(item_id=record.item_id, product_id=record.product_id,
                   decision=Decision(decision), reasons=(Reason.DAMAGE,) if side else (),
                   scores=Scores(0.9 if side else 0.01, None, 0.1, 0.9 if side else 0.01),
                   threshold_version="t1", model_versions={"damage": "1"}, findings=(),
                   captured_ms=1.0, decided_ms=2.0, deadline_ms=5000.0)


def make_export(folder: Path, rows: Sequence[Row], ids: Sequence[str] | None = None, *,
                product: str = "P-BOX-S") -> Path:
    """Snapshots kept by the node's store (every pass sampled), labelled by feedback,
    exported as operators do."""
    rng = np.random.default_rng(0)
    store = SnapshotStore(folder / "snapshots", dataclasses.replace(
        StorageConfig(state_dir=folder), snapshot_pass_sample=1.0, snapshots_min_free_mb=0.0),
        queue_size=2 * len(rows) + 1)
    store.start()
    for n, (decision, feedback) in enumerate(rows):
        record = site_record(ids[n] if ids else f"ITEM-{n:05d}", rng, product)
        store.offer(record, site_verdict(record, decision))
        if feedback is not None:
            assert store.label(record.item_id, feedback)
    store.close(timeout_s=60.0)
    export_snapshots(folder / "snapshots", folder / "export", 0.0)
    return folder / "export"


def ids_on_side(count: int, held_out: bool, start: int) -> list[str]:
    """`count` item IDs that the split holds out (or keeps for training)."""
    out: list[str] = []
    n = start
    while len(out) < count:
        item_id = f"ITEM-{n:05d}"
        if (item_bucket(item_id) < 0.3) == held_out:
            out.append(item_id)
        n += 1
    return out
