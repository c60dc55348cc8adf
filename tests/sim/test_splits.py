"""Benchmark splits: product-disjoint catalogues, held-out prints, labelled datasets."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from edge.catalogue import load_catalogue
from edge.commands.main import main
from edge.infer.dataset import load_dataset
from edge.sim.dataset import SPLIT_DEFAULTS
from edge.sim.products import SPLITS, TEST_ONLY_PRINTS, generate_catalogue
from tests.conftest import LONG_CHECKS

#: Generating train + val + test at their default sizes must take no longer (seconds).
FULL_SIZE_BUDGET_S = 12 * 60


def _catalogues() -> dict[str, object]:
    return {s: generate_catalogue(s, SPLIT_DEFAULTS[s][1], SPLIT_DEFAULTS[s][0].seed)
            for s in SPLITS}


def test_splits_never_share_a_product_or_artwork() -> None:
    """Train, val and test products (at the trainer's sizes, and for any seeds) differ in ID
    and artwork seed; each split's IDs are in its own namespace."""
    seen_ids: dict[str, str] = {}
    seen_art: dict[int, str] = {}
    for split in SPLITS:
        for seed in (SPLIT_DEFAULTS[split][0].seed, 0):
            catalogue = generate_catalogue(split, SPLIT_DEFAULTS[split][1], seed)
            assert len(set(catalogue.ids())) == len(catalogue.products)
            for p in catalogue.products:
                assert p.product_id.startswith(f"{split}-")
                assert p.art_seed is not None
                assert seen_ids.setdefault(p.product_id, split) == split
                assert seen_art.setdefault(p.art_seed, split) == split


def test_test_split_has_print_styles_training_never_sees() -> None:
    """The test split's confounders include a print style absent from train and val, every
    held-out style appears in test, and every split has confounders to measure."""
    styles = {s: {p.artwork for p in generate_catalogue(s, SPLIT_DEFAULTS[s][1],
                                                        SPLIT_DEFAULTS[s][0].seed).products
                  if p.damage_like_print} for s in SPLITS}
    assert TEST_ONLY_PRINTS
    assert set(TEST_ONLY_PRINTS) <= styles["test"]
    assert not set(TEST_ONLY_PRINTS) & (styles["train"] | styles["val"])
    assert all(len(styles[s]) >= 3 for s in SPLITS)


def _rows(out: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]


def _write(out: Path, split: str, *args: str) -> float:
    started = time.monotonic()
    assert main(["synth", "dataset", "--split", split, "--out", str(out), *args]) == 0
    return time.monotonic() - started


def test_split_dataset_is_labelled_and_carries_its_catalogue(tmp_path: Path) -> None:
    """`--split` writes severity, damage sizes, split and print style per row and its own
    catalogue, which `load_catalogue` and `load_dataset` read back; its items are its own
    products; rows and files do not depend on the number of worker processes."""
    small = ("--items", "8", "--products", "6", "--references", "1")
    out = tmp_path / "test"
    _write(out, "test", *small, "--workers", "2")
    rows = _rows(out)
    catalogue = load_catalogue(out / "catalogue.yaml")
    assert catalogue == generate_catalogue("test", 6, SPLIT_DEFAULTS["test"][0].seed)
    assert {r["product_id"] for r in rows} <= set(catalogue.ids())
    assert {r["split"] for r in rows} == {"test"}
    assert {r["role"] for r in rows} == {"item", "reference"}
    for r in rows:
        for key in ("severity", "damage_size_mm", "damage_depth_mm", "print_style"):
            assert key in r
        if r["damage"] is None:
            assert r["severity"] is None
            assert r["damage_size_mm"] is None
        else:
            assert r["severity"] in ("subtle", "moderate", "severe")
            assert isinstance(r["damage_size_mm"], float)
            assert r["damage_size_mm"] > 0
        assert (r["print_style"] is not None) == r["confounder"]
    data = load_dataset(out)
    assert data.catalogue == catalogue
    assert data.split == "test"
    assert len(data.items) == 8
    by_id = {r["item_id"]: r for r in rows if r["role"] == "item"}
    for rec in data.items:
        assert rec.truth is not None
        assert rec.truth.severity == by_id[rec.item_id]["severity"]
        assert rec.truth.damage_size_mm == by_id[rec.item_id]["damage_size_mm"]
    alone = tmp_path / "one-process"
    _write(alone, "test", *small, "--workers", "1")
    assert _rows(alone) == rows
    assert sorted(p.name for p in (alone / "crops").iterdir()) == sorted(
        p.name for p in (out / "crops").iterdir())


@pytest.mark.skipif(not LONG_CHECKS, reason="full-size generation: CV_LONG_CHECKS=1")
@pytest.mark.timeout(FULL_SIZE_BUDGET_S + 300)
def test_full_size_splits_generate_in_time(tmp_path: Path) -> None:
    """Train 3000 + val 1500 + test 2000 items with their references take under 12 minutes
    on the machine's cores, with two views for most items."""
    elapsed = sum(_write(tmp_path / s, s) for s in SPLITS)
    print(f"train + val + test: {elapsed:.0f} s")
    assert elapsed < FULL_SIZE_BUDGET_S
    for split in SPLITS:
        rows = [r for r in _rows(tmp_path / split) if r["role"] == "item"]
        items = {r["item_id"] for r in rows}
        assert len(items) == SPLIT_DEFAULTS[split][0].items
        assert len(rows) > 1.7 * len(items)
