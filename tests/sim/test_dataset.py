"""`edge-node synth dataset`: labelled crops cut exactly as the node cuts them."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from edge.catalogue import load_catalogue
from edge.commands.main import main
from edge.config import load_config
from edge.perception.segmentation import ItemSegmenter
from edge.perception.tracking import crop_detection, truth_of
from edge.sim.conveyor import SyntheticConveyor


def test_dataset_rows_files_and_labels(tmp_path: Path) -> None:
    """Every row points at readable crops; damaged rows have a damage mask; boxes are measured."""
    out = tmp_path / "ds"
    assert main(["synth", "dataset", "--out", str(out), "--items", "24", "--seed", "4",
                 "--references", "1"]) == 0
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    items = [r for r in rows if r["role"] == "item"]
    refs = [r for r in rows if r["role"] == "reference"]
    assert len({r["item_id"] for r in items}) == 24
    assert {r["product_id"] for r in refs} == set(load_catalogue().ids())
    assert all(r["damage"] is None for r in refs)
    errors = []
    for r in items:
        rgb = cv2.imread(str(out / r["rgb"]))
        height = cv2.imread(str(out / r["height"]), cv2.IMREAD_UNCHANGED)
        assert rgb.shape == (128, 128, 3)
        assert height.dtype == np.uint16
        assert (r["damage_mask"] is not None) == (r["damage"] is not None)
        errors += [abs(a - b) for a, b in zip(r["measured_box_mm"], r["box_mm"], strict=True)]
    assert float(np.median(errors)) < 5.0


def test_training_crop_is_the_nodes_crop(tmp_path: Path) -> None:
    """The dataset's crop of an item is byte-identical to the node's crop of the same frame."""
    out = tmp_path / "ds"
    assert main(["synth", "dataset", "--out", str(out), "--items", "3", "--seed", "9",
                 "--references", "0", "--damage-rate", "0"]) == 0
    row = json.loads((out / "index.jsonl").read_text().splitlines()[0])
    cfg = load_config(None)
    import dataclasses

    syn = dataclasses.replace(cfg.synthetic, seed=9, damage_rate=0.0, confounder_rate=0.25,
                              touching_rate=0.0, items_per_second=cfg.synthetic.items_per_second)
    world = SyntheticConveyor(syn, cfg.belt, cfg.cameras, load_catalogue(), start_ms=0.0)
    item = next(it for it in world.schedule.items_until(60_000.0) if it.item_id == row["item_id"])
    cam = row["camera"]
    index = round((item.induct_ms + world.arrival_delay_ms()) / (1000.0 / world.fps(cam)))
    frame = world.render(cam, index)
    seg = ItemSegmenter(cam, world.intrinsics(cam), world.camera_pose(cam), cfg.items)
    det = next(d for d in seg.detect(frame) if (t := truth_of(d)) and t.item_id == item.item_id)
    crop = crop_detection(det, seg.plane, cfg.items.crop_size)
    assert np.array_equal(cv2.imread(str(out / row["rgb"])), crop.color)
