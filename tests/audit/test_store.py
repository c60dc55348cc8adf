"""The audit snapshot ring store: what is kept, what it looks like, and that it stays bounded."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from edge.audit.files import disk_usage, read_sidecar
from edge.audit.overlays import hot_area
from edge.audit.store import ID_PATTERN, SnapshotStore, keep_passed
from edge.commands.main import main as cli_main
from edge.commands.snapshots import parse_since, snapshot_time_s
from edge.config import StorageConfig
from edge.pipeline.metrics import NodeMetrics, NodeSnapshot
from edge.types import Decision, ItemRecord
from tests.audit.helpers import blob_map, make_store, synthetic_records, verdict_for

MB = 1024 * 1024


@pytest.fixture(scope="module")
def damaged() -> list[ItemRecord]:
    """Synthetic items with visible damage (ground-truth mask in at least one crop)."""
    records = synthetic_records(6, damage_rate=1.0)
    return [r for r in records
            if any(c.truth_damage is not None and c.truth_damage.sum() > 30
                   for c in r.crops.values())]


@pytest.fixture(scope="module")
def intact() -> list[ItemRecord]:
    """Synthetic intact items (two camera views each)."""
    return synthetic_records(4, damage_rate=0.0, seed=5)


def _damaged_view(record: ItemRecord) -> str:
    return max(record.crops, key=lambda c: int(record.crops[c].truth_damage.sum())  # type: ignore[union-attr]
               )


def test_sidelined_items_get_an_id_at_once_and_passed_ones_by_sample(
        tmp_path: Path, intact: list[ItemRecord]) -> None:
    """offer() tags every sideline verdict with a sortable ID; passes only when sampled."""
    store = make_store(tmp_path, snapshot_pass_sample=0.0)
    rec = intact[0]
    sidelined = store.offer(rec, verdict_for(rec, Decision.SIDELINE))
    passed = store.offer(rec, verdict_for(rec, Decision.PASS))
    assert sidelined.snapshot_id is not None
    assert ID_PATTERN.match(sidelined.snapshot_id)
    assert abs(snapshot_time_s(sidelined.snapshot_id) - time.time()) < 5.0
    assert passed.snapshot_id is None
    everything = make_store(tmp_path / "all", snapshot_pass_sample=1.0)
    assert everything.offer(rec, verdict_for(rec, Decision.PASS)).snapshot_id is not None
    ids = [f"item-{i}" for i in range(20_000)]
    kept = [i for i in ids if keep_passed(i, 0.01)]
    assert 120 < len(kept) < 280  # ~1 %
    assert kept == [i for i in ids if keep_passed(i, 0.01)]  # the same ones every run


def test_snapshot_holds_pictures_and_the_full_verdict(tmp_path: Path,
                                                      damaged: list[ItemRecord]) -> None:
    """Colour, colour-mapped depth, overlay and a sheet per item; the sidecar has the verdict."""
    rec = damaged[0]
    cam = _damaged_view(rec)
    truth = rec.crops[cam].truth_damage
    assert truth is not None
    store = make_store(tmp_path)
    store.start()
    try:
        v = store.offer(rec, verdict_for(rec, Decision.SIDELINE, anomaly_map=blob_map(truth),
                                         anomaly_camera=cam, box=(10, 20, 30, 25)))
        assert store.flush(10.0)
    finally:
        store.close()
    assert v.snapshot_id is not None
    folder = store.path(v.snapshot_id)
    assert folder is not None
    data = read_sidecar(folder)
    verdict = data["verdict"]
    assert verdict["snapshot_id"] == v.snapshot_id
    assert verdict["decision"] == "sideline"
    assert verdict["reasons"] == ["damage", "anomaly"]
    assert verdict["scores"]["fused"] == pytest.approx(0.95)
    assert verdict["findings"] == [{"type": "crush", "probability": 0.91,
                                    "box_px": [10, 20, 30, 25]}]
    assert verdict["anomaly_camera"] == cam
    assert verdict["model_versions"]["damage"] == "d1"
    assert data["item"]["truth"]["damage"] is not None
    assert data["label"] is None
    assert set(data["views"]) == set(rec.crops)
    size = rec.crops[cam].color.shape[0]
    for view_cam, view in data["views"].items():
        for key in ("color", "height", "mask", "depth", "overlay"):
            img = cv2.imread(str(folder / view[key]), cv2.IMREAD_UNCHANGED)
            assert img is not None, view[key]
        assert cv2.imread(str(folder / view["color"])).shape == (size, size, 3)
        assert cv2.imread(str(folder / view["overlay"])).shape == (2 * size, 2 * size, 3)
        assert cv2.imread(str(folder / view["depth"])).shape == (size, size, 3)
        depth = cv2.imread(str(folder / view["depth"]))
        assert depth.std() > 5  # colour-mapped heights, not a blank picture
        assert view["anomaly_map"] is (view_cam == cam)
    assert cv2.imread(str(folder / "sheet.jpg")) is not None
    assert np.load(folder / "anomaly_map.npy").shape == (size, size)


def test_overlay_heat_lands_on_the_damage_in_crop_coordinates(
        tmp_path: Path, damaged: list[ItemRecord]) -> None:
    """A map hot where the damage is gives an overlay whose hot (red) pixels cover it."""
    store = make_store(tmp_path)
    store.start()
    tagged = []
    for rec in damaged:
        cam = _damaged_view(rec)
        truth = rec.crops[cam].truth_damage
        assert truth is not None
        tagged.append((rec, cam, store.offer(rec, verdict_for(
            rec, Decision.SIDELINE, anomaly_map=blob_map(truth), anomaly_camera=cam))))
    assert store.flush(20.0)
    store.close()
    assert len(tagged) >= 3
    for rec, cam, v in tagged:
        truth = rec.crops[cam].truth_damage
        assert truth is not None
        assert v.snapshot_id is not None
        folder = store.path(v.snapshot_id)
        assert folder is not None
        overlay = cv2.imread(str(folder / f"{cam}_overlay.jpg")).astype(np.int32)
        plain = cv2.imread(str(folder / f"{cam}_color.png"))
        plain2 = cv2.resize(plain, overlay.shape[1::-1]).astype(np.int32)
        marked = np.abs(overlay - plain2).sum(axis=2) > 90  # heat painted over the item
        truth2 = cv2.resize(truth.astype(np.uint8), marked.shape[::-1],
                            interpolation=cv2.INTER_NEAREST) > 0
        near = cv2.dilate(truth2.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
        hits = int((marked & truth2).sum())
        assert hits > 0.5 * truth2.sum(), (rec.item_id, hits, int(truth2.sum()))
        assert int((marked & near).sum()) > 0.7 * marked.sum()  # and not all over the item
        # Reading the stored map back gives the same hot area.
        amap = np.load(folder / "anomaly_map.npy")
        assert int((hot_area(amap) & truth).sum()) > 0.5 * truth.sum()


def test_ring_store_stays_within_its_size_cap_over_a_long_run(
        shm_tmp_path: Path, intact: list[ItemRecord]) -> None:
    """Hundreds of snapshots into a 2 MB store: never over the cap, the newest kept. (On
    tmpfs: each snapshot is a dozen fsynced files, 20-30 s on a disk for nothing measured.)"""
    store = make_store(shm_tmp_path, snapshots_max_mb=2.0, snapshot_pass_sample=1.0)
    store.start()
    offered: list[str] = []
    try:
        for i in range(300):
            rec = dataclasses.replace(intact[i % len(intact)], item_id=f"long-{i:04d}")
            v = store.offer(rec, verdict_for(rec, Decision.SIDELINE if i % 3 else Decision.PASS))
            assert v.snapshot_id is not None
            offered.append(v.snapshot_id)
            if i % 10 == 9:
                assert store.flush(20.0)
                assert disk_usage(store.root) <= 2.0 * MB
                assert store.total_bytes <= 2.0 * MB
    finally:
        store.close()
    kept = store.ids()
    assert store.stats.saved == 300
    assert store.stats.dropped_queue_full == 0
    assert 5 <= len(kept) < 300
    assert kept == offered[-len(kept):]  # oldest deleted first, newest all there
    assert store.stats.evicted["size"] == 300 - len(kept)
    assert sorted(p.name for p in store.root.iterdir()) == kept


def test_snapshots_past_their_age_are_deleted(tmp_path: Path,
                                              intact: list[ItemRecord]) -> None:
    """With the clock moved past `snapshots_max_age_h`, old snapshots go, new ones stay."""
    now = [1_800_000_000.0]
    cfg = dataclasses.replace(StorageConfig(), snapshots_max_age_h=1.0, snapshots_min_free_mb=0.0)
    store = SnapshotStore(tmp_path / "s", cfg, wall=lambda: now[0])
    store.start()
    old = [store.offer(r, verdict_for(r, Decision.SIDELINE)).snapshot_id for r in intact[:2]]
    assert store.flush(10.0)
    now[0] += 2 * 3600.0
    new = store.offer(intact[2], verdict_for(intact[2], Decision.SIDELINE)).snapshot_id
    assert store.flush(10.0)
    store.close()
    assert store.ids() == [new]
    assert store.stats.evicted["age"] == 2
    assert all(not (store.root / str(sid)).exists() for sid in old)


def test_store_never_takes_the_last_free_space_on_the_disk(
        tmp_path: Path, intact: list[ItemRecord]) -> None:
    """On a nearly full disk the oldest snapshots go first; with nothing left to delete the
    snapshot is skipped and counted, never written."""
    root = tmp_path / "s"
    capacity = 3 * MB  # a small disk: what the store writes is what fills it
    cfg = dataclasses.replace(StorageConfig(), snapshots_min_free_mb=2.5)

    def free(_: Path) -> int:
        return capacity - disk_usage(root)

    store = SnapshotStore(root, cfg, free_bytes=free)
    store.start()
    for i in range(40):
        rec = dataclasses.replace(intact[i % len(intact)], item_id=f"disk-{i}")
        store.offer(rec, verdict_for(rec, Decision.SIDELINE))
        assert store.flush(10.0)
        assert free(root) >= 2.5 * MB
    store.close()
    assert store.stats.saved > 0
    assert store.stats.evicted["disk"] > 0
    full = SnapshotStore(tmp_path / "full", cfg, free_bytes=lambda _: 1 * MB)
    full.start()
    v = full.offer(intact[0], verdict_for(intact[0], Decision.SIDELINE))
    assert full.flush(10.0)
    full.close()
    assert full.stats.skipped_disk_full == 1
    assert full.ids() == []
    assert v.snapshot_id is not None
    assert full.path(v.snapshot_id) is None


def test_a_disk_error_while_idle_does_not_end_the_writer(
        tmp_path: Path, intact: list[ItemRecord], monkeypatch: pytest.MonkeyPatch) -> None:
    """The periodic prune meets an I/O error (disk unmounted for a moment): the writer goes
    on and stores the next snapshot. It used to die, and every later snapshot was dropped."""
    import edge.audit.store

    monkeypatch.setattr(edge.audit.store, "_PRUNE_EVERY_S", 0.05)
    failing = {"now": False}

    def free(_: Path) -> int:
        if failing["now"]:
            raise OSError(5, "Input/output error")
        return 10_000 * MB

    store = SnapshotStore(tmp_path / "s", StorageConfig(), free_bytes=free)
    store.start()
    store.offer(intact[0], verdict_for(intact[0], Decision.SIDELINE))
    assert store.flush(10.0)
    failing["now"] = True
    time.sleep(0.5)  # several idle prunes fail
    failing["now"] = False
    rec = dataclasses.replace(intact[1], item_id="after-the-error")
    v = store.offer(rec, verdict_for(rec, Decision.SIDELINE))
    assert store.flush(10.0)
    store.close()
    assert v.snapshot_id is not None
    assert store.path(v.snapshot_id) is not None


def test_full_queue_drops_and_counts_without_blocking(tmp_path: Path,
                                                      intact: list[ItemRecord]) -> None:
    """With the writer stalled, offer() returns at once; items beyond the queue get no ID."""
    store = SnapshotStore(tmp_path / "s", StorageConfig(snapshots_min_free_mb=0.0),
                          queue_size=4)  # writer not started: nothing drains the queue
    t0 = time.perf_counter()
    ids = [store.offer(intact[0], verdict_for(intact[0], Decision.SIDELINE)).snapshot_id
           for _ in range(10)]
    assert time.perf_counter() - t0 < 0.5
    assert sum(i is not None for i in ids) == 4
    assert ids[4:] == [None] * 6
    assert store.stats.dropped_queue_full == 6


def test_restart_indexes_old_snapshots_and_removes_half_written_ones(
        tmp_path: Path, intact: list[ItemRecord]) -> None:
    """A new store over the same directory knows the old snapshots; leftovers are removed."""
    store = make_store(tmp_path)
    store.start()
    sid = store.offer(intact[0], verdict_for(intact[0], Decision.SIDELINE)).snapshot_id
    store.close()
    (store.root / ".tmp-20260101T000000000-abcd-000001").mkdir()
    again = make_store(tmp_path)
    assert again.ids() == [sid]
    assert again.total_bytes == store.total_bytes
    assert not (store.root / ".tmp-20260101T000000000-abcd-000001").exists()


def test_feedback_labels_are_exported_for_retraining(tmp_path: Path,
                                                     intact: list[ItemRecord],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """label() writes the controller's feedback beside the snapshot; `snapshots export`
    bundles the crops with an index of training labels."""
    store = make_store(tmp_path)
    store.start()
    a, b, c = intact[:3]
    for rec in (a, b, c):
        store.offer(rec, verdict_for(rec, Decision.SIDELINE))
    assert store.label(a.item_id, "false_positive", note="just a print")
    assert store.label(b.item_id, "confirmed_damage")
    assert not store.label("never-seen", "confirmed_damage")
    assert store.flush(10.0)
    store.close()
    assert store.stats.labels == 2
    assert store.stats.labels_unmatched == 1
    out = tmp_path / "export"
    assert cli_main(["snapshots", "export", "--dir", str(store.root), "--since", "1h",
                     "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # after any logs
    assert summary["exported"] == 3
    lines = [json.loads(x) for x in (out / "index.jsonl").read_text().splitlines()]
    by_item = {x["item_id"]: x for x in lines}
    assert by_item[a.item_id]["training_label"] == "intact"
    assert by_item[a.item_id]["feedback"] == "false_positive"
    assert by_item[b.item_id]["training_label"] == "damaged"
    assert by_item[c.item_id]["training_label"] == "unreviewed"
    for x in lines:
        for view in x["views"].values():
            assert cv2.imread(str(out / x["snapshot_id"] / view["color"])) is not None
    assert read_sidecar(out / by_item[a.item_id]["snapshot_id"])["label"]["note"] == "just a print"
    future = tmp_path / "none"
    assert cli_main(["snapshots", "export", "--dir", str(store.root), "--since",
                     "2099-01-01", "--out", str(future)]) == 0
    assert (future / "index.jsonl").read_text() == ""


def test_store_counters_are_in_the_node_registry(tmp_path: Path,
                                                 intact: list[ItemRecord]) -> None:
    """cv_snapshots_* appear in the node's /metrics text and parse."""
    store = make_store(tmp_path)
    metrics = NodeMetrics(NodeSnapshot)
    metrics.register()
    store.register_metrics(metrics.registry)
    store.start()
    store.offer(intact[0], verdict_for(intact[0], Decision.SIDELINE))
    assert store.flush(10.0)
    store.close()
    families = {f.name: f for f in text_string_to_metric_families(
        metrics.exposition().decode())}
    assert families["cv_snapshots_saved"].samples[0].value == 1
    assert families["cv_snapshots_stored"].samples[0].value == 1
    assert families["cv_snapshots_bytes"].samples[0].value == store.total_bytes > 0


@settings(max_examples=200, deadline=None)
@given(n=st.integers(min_value=0, max_value=10_000), unit=st.sampled_from("smhdw"))
def test_since_accepts_durations(n: int, unit: str) -> None:
    """`--since 90m` means 90 minutes before now, for every unit."""
    secs = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]
    assert parse_since(f"{n}{unit}", now_s=2e9) == 2e9 - n * secs


@settings(max_examples=200, deadline=None)
@given(when=st.datetimes(min_value=__import__("datetime").datetime(2000, 1, 1),
                         max_value=__import__("datetime").datetime(2099, 1, 1)))
def test_since_accepts_iso_times_as_utc(when: object) -> None:
    """An ISO date/time without an offset is UTC; with 'Z' the same instant."""
    import datetime as dt

    assert isinstance(when, dt.datetime)
    expected = when.replace(tzinfo=dt.timezone.utc).timestamp()
    assert parse_since(when.isoformat()) == expected
    assert parse_since(when.isoformat() + "Z") == expected


def test_since_rejects_nonsense() -> None:
    """A bad --since names the option and what it expects."""
    from edge.config import ConfigError

    with pytest.raises(ConfigError, match="--since"):
        parse_since("yesterday-ish")


def test_an_unreadable_label_does_not_hide_the_snapshot(tmp_path: Path,
                                                        intact: list[ItemRecord]) -> None:
    """What a power cut mid-label can leave (an empty label.json): the audit record and its
    verdict are still read, without the label. It used to raise, and the snapshot vanished
    from the live page and the export."""
    store = SnapshotStore(tmp_path / "s", StorageConfig(snapshots_min_free_mb=0.0))
    store.start()
    v = store.offer(intact[0], verdict_for(intact[0], Decision.SIDELINE))
    assert store.flush(10.0)
    store.close()
    assert v.snapshot_id is not None
    folder = store.path(v.snapshot_id)
    assert folder is not None
    (folder / "label.json").write_text("")
    data = read_sidecar(folder)
    assert data["label"] is None
    assert data["verdict"]["decision"] == "sideline"
