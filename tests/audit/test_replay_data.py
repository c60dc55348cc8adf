"""What a snapshot keeps for replay, and how a shadow disagreement marks it."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.audit.files import disk_usage, read_sidecar
from edge.audit.replay import REPLAY_SCHEMA, ModelContext, NotReplayableError, load_stored_item
from edge.audit.store import SnapshotStore
from edge.catalogue import load_catalogue
from edge.config import load_config
from edge.infer.gallery import ReferenceGallery
from edge.infer.inspector import DAMAGE, EMBEDDING, ItemInspector
from edge.infer.manifest import load_manifest
from edge.infer.runtimes import open_backend
from edge.types import Decision, ItemCrop, ItemRecord
from tests.audit.candidates import candidate_manifest
from tests.audit.helpers import make_store, synthetic_records, verdict_for


@pytest.fixture(scope="module")
def records() -> list[ItemRecord]:
    """Synthetic items with crops from both cameras."""
    return synthetic_records(3, damage_rate=0.0, seed=8)


def _context(record: ItemRecord) -> dict[str, Any]:
    return {"schema": REPLAY_SCHEMA, "manifest": {"sha256": "f" * 64},
            "views": sorted(record.crops)}


def test_a_snapshot_gives_back_the_item_exactly_as_the_models_saw_it(
        tmp_path: Path, records: list[ItemRecord]) -> None:
    """Colour, mask and height of every view come back bit for bit (heights finer than the
    PNG's 0.1 mm, NaN and negative ones included), with the record's flags and geometry; a
    snapshot taken without replay data says why it cannot be replayed."""
    store = make_store(tmp_path, snapshot_pass_sample=1.0)
    base = records[0]
    cam = sorted(base.crops)[0]
    height = base.crops[cam].height_mm.copy()
    height[0, :3] = (np.nan, -0.25, 1e-7)
    height[1] += np.float32(0.0123)
    crops = {**base.crops, cam: dataclasses.replace(base.crops[cam], height_mm=height,
                                                    has_depth=False)}
    record = dataclasses.replace(base, crops=crops, views_missing=("side",), merged=True,
                                 unannounced=True, box_mm=(301.25, 200.125, 99.0625))
    kept = store.offer(record, verdict_for(record, Decision.PASS), _context(record))
    older = store.offer(records[1], verdict_for(records[1], Decision.SIDELINE))
    store.start()
    assert store.flush(10.0)
    store.close()
    assert kept.snapshot_id is not None
    assert older.snapshot_id is not None

    item = load_stored_item(store.root / kept.snapshot_id)
    assert item.replay == _context(record)
    assert item.verdict["decision"] == "pass"
    got = item.record
    for name in ("item_id", "product_id", "track_id", "box_mm", "centre_mm", "captured_ms",
                 "deadline_ms", "first_seen_ms", "views_missing", "merged", "unannounced"):
        assert getattr(got, name) == getattr(record, name), name
    assert sorted(got.crops) == sorted(record.crops)
    for view, crop in got.crops.items():
        want: ItemCrop = record.crops[view]
        assert crop.color.dtype == want.color.dtype
        assert np.array_equal(crop.color, want.color)
        assert np.array_equal(crop.mask, want.mask)
        assert crop.height_mm.dtype == np.float32
        assert np.array_equal(crop.height_mm, want.height_mm, equal_nan=True)
        assert crop.has_depth == want.has_depth
    with pytest.raises(NotReplayableError, match="without replay data"):
        load_stored_item(store.root / older.snapshot_id)


def test_a_shadow_disagreement_marks_the_items_snapshot_or_gets_one_of_its_own(
        tmp_path: Path, records: list[ItemRecord]) -> None:
    """A sidelined item's snapshot gets the shadow block in its sidecar (its verdict and its
    feedback label kept, the store's size account right); a passed item that was not
    sampled gets a snapshot of its own, with the block, which feedback then labels."""
    store = make_store(tmp_path, snapshot_pass_sample=0.0)
    sidelined, passed = records[0], records[1]
    verdict = store.offer(sidelined, verdict_for(sidelined, Decision.SIDELINE),
                          _context(sidelined))
    unsampled = store.offer(passed, verdict_for(passed, Decision.PASS), _context(passed))
    assert verdict.snapshot_id is not None
    assert unsampled.snapshot_id is None
    store.start()
    assert store.label(sidelined.item_id, "false_positive")
    block = {"disagreement": "candidate_passes", "candidate": {"decision": "pass"}}
    assert store.offer_shadow(sidelined, verdict, block) == verdict.snapshot_id
    made = store.offer_shadow(passed, unsampled, {**block, "disagreement": "candidate_sidelines"},
                              context=_context(passed))
    assert made is not None
    assert store.label(passed.item_id, "confirmed_damage")
    assert store.flush(10.0)
    store.close()

    marked = read_sidecar(store.root / verdict.snapshot_id)
    assert marked["shadow"] == block
    assert marked["verdict"]["decision"] == "sideline"
    assert marked["label"]["kind"] == "false_positive"
    assert marked["replay"] == _context(sidelined)
    own = read_sidecar(store.root / made)
    assert own["replay"] == _context(passed)
    assert own["shadow"]["disagreement"] == "candidate_sidelines"
    assert own["verdict"]["decision"] == "pass"
    assert own["label"]["kind"] == "confirmed_damage"
    assert store.total_bytes == sum(disk_usage(store.root / s) for s in store.ids())


def test_shadow_snapshots_yield_to_production(tmp_path: Path, records: list[ItemRecord]) -> None:
    """While the writer's queue is half full or more a shadow disagreement gets no snapshot
    (the caller counts it; production's drops do not), and production's snapshots still
    queue. On a full disk the shadow-only snapshot goes first, before older production
    ones."""
    busy = SnapshotStore(tmp_path / "busy", make_store(tmp_path / "cfg").cfg, queue_size=4)
    for record in records[:2]:
        assert busy.offer(record, verdict_for(record, Decision.SIDELINE)).snapshot_id
    shadow_block = {"disagreement": "candidate_sidelines"}
    unsampled = verdict_for(records[2], Decision.PASS)
    assert busy.offer_shadow(records[2], unsampled, shadow_block) is None
    assert busy.offer(records[2], verdict_for(records[2], Decision.SIDELINE)).snapshot_id
    assert busy.queue_depth == 3
    assert busy.stats.dropped_queue_full == 0

    capacity = [10**12]
    cfg = dataclasses.replace(make_store(tmp_path / "cfg").cfg, snapshot_pass_sample=0.0)
    store = SnapshotStore(tmp_path / "ring", cfg,
                          free_bytes=lambda _: capacity[0] - store.total_bytes)
    store.start()
    oldest = store.offer(records[0], verdict_for(records[0], Decision.SIDELINE)).snapshot_id
    assert store.flush(10.0)
    shadow_only = store.offer_shadow(records[1], verdict_for(records[1], Decision.PASS),
                                     shadow_block)
    assert store.flush(10.0)
    newer = store.offer(records[2], verdict_for(records[2], Decision.SIDELINE)).snapshot_id
    assert store.flush(10.0)
    largest = max(disk_usage(store.root / s) for s in store.ids())
    capacity[0] = store.total_bytes + largest - 1  # room for one more only without one of them
    newest = store.offer(records[0], verdict_for(records[0], Decision.SIDELINE)).snapshot_id
    assert store.flush(10.0)
    store.close()
    assert store.ids() == [oldest, newer, newest]
    assert shadow_only is not None
    assert not (store.root / shadow_only).exists()
    assert store.stats.evicted["disk"] == 1


def test_what_judged_an_item_is_the_manifest_as_loaded_and_never_an_error(
        tmp_path: Path, records: list[ItemRecord]) -> None:
    """The context names the manifest by the sha256 of the bytes the models were loaded from:
    a manifest rewritten or removed since changes nothing and costs no file read. A context
    that cannot be built says why instead of raising: the item keeps its snapshot, which is
    then not replayable."""
    manifest = candidate_manifest(tmp_path / "models", fused_scale=1.0)
    loaded = hashlib.sha256(manifest.read_bytes()).hexdigest()
    cfg = load_config(None)
    spec = load_manifest(manifest)
    inspector = ItemInspector(spec, open_backend(spec.model(EMBEDDING), cfg.models),
                              open_backend(spec.model(DAMAGE), cfg.models),
                              gallery=ReferenceGallery(None), catalogue=load_catalogue(),
                              cfg=cfg.models)
    try:
        context = ModelContext(inspector, cfg.decision)
        manifest.write_text(manifest.read_text() + "# edited after the load\n")
        assert context(records[0])["manifest"]["sha256"] == loaded
        manifest.unlink()
        block = context(records[0])
        assert block["manifest"]["sha256"] == loaded
        assert block["gallery"] == {"model": None, "dir": None,
                                    "views": dict.fromkeys(sorted(records[0].crops), 0)}
        odd = dataclasses.replace(records[1], crops={**records[1].crops, 7: None})
        broken = context(odd)
    finally:
        inspector.close()
    assert broken["unknown"].startswith("TypeError")
    store = make_store(tmp_path, snapshot_pass_sample=1.0)
    kept = store.offer(records[1], verdict_for(records[1], Decision.SIDELINE), broken)
    store.start()
    assert store.flush(10.0)
    store.close()
    assert kept.snapshot_id is not None
    with pytest.raises(NotReplayableError, match="could not be recorded"):
        load_stored_item(store.root / kept.snapshot_id)
