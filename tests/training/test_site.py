"""`edge-node train` on a small export (edge/training/site.py): the node's gallery, the target a
few held-out items can hold, the two-fold figure, the synthetic targets, a durable candidate
folder, and failures that end in one line."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from edge.commands.main import main
from edge.config import DEFAULT_MANIFEST, ModelsConfig
from edge.infer.backend import BackendError
from edge.infer.dataset import DatasetError
from edge.infer.fusion import Fusion
from edge.infer.inspector import ItemInference
from edge.infer.manifest import load_manifest
from edge.infer.offline import memory_inspector
from edge.training.site_data import SiteItem, item_bucket, load_export
from tests.audit.helpers import synthetic_records
from tests.training.helpers import Row, fast_dir, ids_on_side, make_export, site_record

pytest.importorskip("torch", reason="training needs the train extra (CI installs it)")

from edge.training import site
from edge.training.finetune import build_tensors

#: A product of the site's that the shipped reference views do not have: the node learned it
#: (packaging_changed feedback), so only the node's gallery knows it.
SITE_PRODUCT = "P-SITE-NEW"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _ids() -> tuple[list[str], list[str]]:
    """(damaged, intact) item IDs: enough of each on both sides of the split."""
    damaged = ids_on_side(6, True, 0) + ids_on_side(16, False, 0)
    intact = ids_on_side(18, True, 50_000) + ids_on_side(36, False, 50_000)
    return damaged, intact


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`edge-node train --config NODE.yaml` on labelled snapshots of the site's product, whose
    references are in the node's gallery (models.gallery_dir of the config) alone."""
    base = tmp_path_factory.mktemp("site")
    with fast_dir(base) as folder:
        damaged, intact = _ids()
        rows: list[Row] = ([("sideline", "confirmed_damage")] * len(damaged)
                           + [("pass", None)] * len(intact))
        export = make_export(folder, rows, damaged + intact, product=SITE_PRODUCT)
        gallery = folder / "gallery"
        node = memory_inspector(ModelsConfig(manifest=DEFAULT_MANIFEST, max_batch=8), gallery)
        views = site_record("REFERENCE", np.random.default_rng(7), SITE_PRODUCT).crops
        for cam, crop in views.items():
            node.learn_views(SITE_PRODUCT, cam, [crop.color])
        node.close()
        before = _files(gallery)
        config = folder / "node.yaml"
        config.write_text(yaml.safe_dump({"models": {"gallery_dir": str(gallery)}}))
        out = folder / "candidate"
        argv = ["train", "--data", str(export), "--out", str(out), "--config", str(config),
                "--epochs", "1", "--threads", "1"]
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(argv)
        yield {"code": code, "out": out, "export": export, "gallery": gallery,
               "gallery_before": before, "stdout": stdout.getvalue(),
               "stderr": stderr.getvalue()}


def test_the_candidate_is_judged_against_the_nodes_gallery(trained: dict[str, Any]) -> None:
    """With the node's config, both models score the site's product against the node's
    gallery (read, never written): every held-out item has an anomaly score, and the
    metrics and the card count the items per input combination."""
    assert trained["code"] == 0, trained["stderr"]
    metrics = json.loads((trained["out"] / "metrics.json").read_text())
    held = metrics["held_out"]
    assert metrics["gallery"] == str(trained["gallery"])
    for name in ("current", "candidate"):
        combos = held[name]["by_combination"]
        assert combos["no_depth"]["items"] == held["items"]  # gallery, no catalogue geometry
        assert combos["classifier_only"]["items"] == 0
    assert _files(trained["gallery"]) == trained["gallery_before"]
    card = (trained["out"] / "damage" / "MODEL_CARD.md").read_text()
    assert f"the node's reference gallery `{trained['gallery']}`" in card
    assert f"| no_depth | {held['items']} |" in card


def test_a_candidate_without_full_inputs_or_enough_good_items_says_so(
        trained: dict[str, Any]) -> None:
    """No held-out item had every input (the product has no catalogue geometry): a warning
    on stderr and in the card. Thresholds fitted on n intact items cannot hold 0.5 %: the
    candidate's thresholds say the target they can hold, 1/(n+1), beside the one asked for,
    and so do stderr and the card."""
    metrics = json.loads((trained["out"] / "metrics.json").read_text())
    intact = metrics["held_out"]["intact"]
    thresholds = load_manifest(trained["out"] / "manifest.yaml").thresholds
    assert thresholds["target_fpr"] == pytest.approx(1 / (intact + 1))
    assert thresholds["requested_target_fpr"] == 0.005
    assert metrics["target_fpr"] == thresholds["target_fpr"]
    card = (trained["out"] / "damage" / "MODEL_CARD.md").read_text()
    err = trained["stderr"]
    assert f"fitted on {intact} intact held-out items" in err
    assert "the `full` combination" in err
    assert err.count("edge-node train: warning: ") == 2
    assert "## Warnings" in card
    assert "the `full` combination" in card
    assert "not the 0.5% asked for" in card
    assert json.loads(trained["stdout"])["warnings"] == metrics["warnings"]


def test_both_models_are_compared_on_the_held_out_items(trained: dict[str, Any]) -> None:
    """The held-out items are the export's labelled items the split holds out (by item ID,
    never a training item), and both models were judged on each of them."""
    metrics = json.loads((trained["out"] / "metrics.json").read_text())
    held = metrics["held_out"]
    labelled = {i.item_id for i in load_export(trained["export"]).items}
    assert set(held["item_ids"]) == {i for i in labelled if item_bucket(i) < 0.3}
    assert len(held["item_ids"]) == held["items"]
    assert held["current"]["items"] == held["candidate"]["items"] == held["items"]


def _site_items(n: int) -> list[SiteItem]:
    rng = np.random.default_rng(3)
    return [SiteItem(site_record(f"FOLD-{k:04d}", rng), "damaged" if k % 2 else "intact",
                     "pass", "x") for k in range(n)]


def test_the_two_fold_figure_refits_the_fusion_in_each_fold() -> None:
    """Two-fold: fusion and thresholds fitted on one half of the held-out items, judged on
    the other. On a site where the gallery's anomaly tells damage apart the other way round
    from the shipped fusion's weights, a fusion refitted in the fold catches the damage; the
    shipped weights with refitted thresholds alone would catch none of it."""
    manifest = load_manifest(DEFAULT_MANIFEST)
    shipped = Fusion.from_mapping(manifest.fusion)
    items = _site_items(80)
    rng = np.random.default_rng(4)
    results = []
    for item in items:
        raw = (0.30 if item.damaged else 0.90) + 0.02 * float(rng.random())
        anomaly = shipped.normalize_anomaly(raw)
        results.append(ItemInference(0.5, {}, anomaly, raw, None, None, None,
                                     shipped.fuse(0.5, anomaly, None)))
    rates = site.two_fold(items, results, manifest, target=0.05)
    assert rates["recall"] == 1.0
    assert rates["false_positive_rate"] <= 0.2  # a 5 % quantile of 20 good items, judged on 20


def test_a_synthetic_view_that_hides_the_damage_trains_as_intact() -> None:
    """A damaged synthetic item's view that does not show the damage (its truth mask is
    empty) is no damage to learn: neither the any-damage target nor the type's is set;
    the view that shows it sets both."""
    record = synthetic_records(1, damage_rate=1.0, seed=5)[0]
    assert record.truth is not None
    assert record.truth.damage is not None
    cams = sorted(record.crops)
    shown = record.crops[cams[0]]
    assert shown.truth_damage is not None
    shown = dataclasses.replace(shown, truth_damage=np.ones_like(shown.truth_damage))
    hidden = dataclasses.replace(record.crops[cams[-1]],
                                 truth_damage=np.zeros_like(shown.truth_damage))
    record = dataclasses.replace(record, crops={cams[0]: shown, "hidden": hidden})
    inspector = memory_inspector(ModelsConfig(manifest=DEFAULT_MANIFEST, max_batch=8))
    try:
        crops = site._synthetic_crops([record], weight=1.0)
        tensors = build_tensors(crops, inspector)
    finally:
        inspector.close()
    assert len(crops) == 2  # the view that shows the damage, then the one that hides it
    assert tensors.targets[1].sum().item() == 0.0
    assert tensors.targets[0, 0].item() == 1.0
    assert tensors.targets[0, 1:].sum().item() == 1.0


def test_the_candidate_folder_is_on_disk_before_it_takes_its_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file of the candidate folder, in sub-folders too, is fsynced before the folder
    is renamed to `--out`: after a power cut, a folder there holds what was written."""
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src: Any, dst: Any) -> None:
        events.append(("rename", str(src)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    out = tmp_path / "candidate"
    with site._staging(out) as staging:
        (staging / "damage").mkdir()
        (staging / "damage" / "damage.onnx").write_bytes(b"weights")
        (staging / "manifest.yaml").write_text("version: x\n")
        written = {str(p) for p in staging.rglob("*") if p.is_file()}
    moved = [k for k, (what, _) in enumerate(events) if what == "rename"]
    assert len(moved) == 1
    synced = {path for what, path in events[:moved[0]] if what == "fsync"}
    assert written <= synced
    assert (out / "damage" / "damage.onnx").read_bytes() == b"weights"


@pytest.mark.parametrize("error", [BackendError("the provider failed\n  at load"),
                                   DatasetError("synthetic items: bad spec"),
                                   ValueError("no nominal items")])
def test_a_failure_on_the_way_exits_1_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        error: Exception) -> None:
    """Models that fail to run, synthetic data that cannot be made, numbers that cannot be
    fitted: exit 1 and one line saying what failed, no traceback, nothing at --out."""
    damaged, intact = _ids()
    rows: list[Row] = ([("sideline", "confirmed_damage")] * len(damaged)
                       + [("pass", None)] * len(intact))
    with fast_dir(tmp_path) as folder:
        export = make_export(folder, rows, damaged + intact)

        def fail(*_a: object, **_k: object) -> object:
            raise error

        monkeypatch.setattr(site, "train_candidate", fail)
        out = tmp_path / "candidate"
        assert main(["train", "--data", str(export), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"edge-node train: failed: {type(error).__name__}: ")
    assert err.count("\n") == 1
    assert not out.exists()
