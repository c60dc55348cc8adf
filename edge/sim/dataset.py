"""Training sets from the synthetic conveyor: item crops with labels, and pristine references.

Each item is found and cut out exactly as the node does it at run time: the
item segmenter on noisy depth, its measured box, and the tracker's crop of
the detection; ground truth only says which detection is which item. So the
models train on the crops they will see.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import structlog

from edge.catalogue import DEFAULT_CATALOGUE, Catalogue
from edge.config import Config
from edge.perception.segmentation import ItemSegmenter
from edge.perception.tracking import crop_detection, truth_of
from edge.sim.conveyor import SyntheticConveyor
from edge.sim.world import SceneItem
from edge.types import Frame, ItemCrop

log = structlog.get_logger(__name__)

#: Height PNGs store 0.1 mm per unit.
HEIGHT_UNITS_PER_MM = 10.0
#: A view showing less of the item than this (pixels) is not written.
MIN_VIEW_PIXELS = 400


@dataclass(frozen=True, slots=True)
class ItemView:
    """One camera's view of one item, as the node would cut it out."""

    item: SceneItem
    crop: ItemCrop
    measured_box_mm: tuple[float, float, float]


def item_views(world: SyntheticConveyor, item: SceneItem, crop_size: int,
               segmenters: dict[str, ItemSegmenter]) -> Iterator[ItemView]:
    """The crops of `item` from every camera, when its centre passes the camera centre."""
    centre_ms = item.induct_ms + world.arrival_delay_ms()
    for cam in world.camera_ids:
        index = round(centre_ms / (1000.0 / world.fps(cam)))
        frame = world.render(cam, index)
        view = _cut(frame, item, crop_size, segmenters[cam])
        if view is not None:
            yield view


def _cut(frame: Frame, item: SceneItem, crop_size: int, segmenter: ItemSegmenter
         ) -> ItemView | None:
    """The node's detection of `item` in `frame`, if the item is wholly in view."""
    for det in segmenter.detect(frame):
        truth = truth_of(det)
        if truth is None or truth.item_id != item.item_id:
            continue
        if not det.complete or det.area_px < MIN_VIEW_PIXELS:
            return None
        crop = crop_detection(det, segmenter.plane, crop_size)
        return ItemView(item, crop, det.box_mm)
    return None


def _write_view(out: Path, role: str, view: ItemView) -> dict[str, object]:
    stem = f"{view.item.item_id}_{view.crop.camera_id}"
    crops = out / "crops"
    cv2.imwrite(str(crops / f"{stem}.png"), view.crop.color)
    h = np.clip(view.crop.height_mm * HEIGHT_UNITS_PER_MM, 0, 65535).astype(np.uint16)
    cv2.imwrite(str(crops / f"{stem}_h.png"), h)
    cv2.imwrite(str(crops / f"{stem}_m.png"), view.crop.mask.astype(np.uint8) * 255)
    damage_path = None
    truth = view.item.truth
    if truth.damage is not None and view.crop.truth_damage is not None:
        damage_path = f"crops/{stem}_d.png"
        cv2.imwrite(str(out / damage_path), view.crop.truth_damage.astype(np.uint8) * 255)
    return {
        "item_id": truth.item_id,
        "product_id": truth.product_id,
        "role": role,
        "damage": truth.damage.value if truth.damage else None,
        "confounder": truth.confounder,
        "camera": view.crop.camera_id,
        "box_mm": [round(v, 2) for v in truth.box_mm],
        "measured_box_mm": [round(v, 2) for v in view.measured_box_mm],
        "rgb": f"crops/{stem}.png",
        "height": f"crops/{stem}_h.png",
        "mask": f"crops/{stem}_m.png",
        "damage_mask": damage_path,
    }


def write_dataset(out: Path, cfg: Config, catalogue: Catalogue, *, items: int, seed: int,
                  damage_rate: float, confounder_rate: float, references: int) -> dict[str, int]:
    """Write `items` labelled items plus `references` pristine views per product."""
    (out / "crops").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(DEFAULT_CATALOGUE, out / "catalogue.yaml")
    counts = {"items": 0, "crops": 0, "references": 0, "damaged": 0}
    syn = dataclasses.replace(cfg.synthetic, seed=seed, damage_rate=damage_rate,
                              confounder_rate=confounder_rate, touching_rate=0.0,
                              items_per_second=max(cfg.synthetic.items_per_second, 1.0))
    world = SyntheticConveyor(syn, cfg.belt, cfg.cameras, catalogue, start_ms=0.0)
    segmenters = {c: ItemSegmenter(c, world.intrinsics(c), world.camera_pose(c), cfg.items)
                  for c in world.camera_ids}
    with (out / "index.jsonl").open("w", encoding="utf-8") as index:
        pristine = dataclasses.replace(syn, seed=seed + 1_000_003, damage_rate=0.0,
                                       confounder_rate=0.3)
        ref_world = SyntheticConveyor(pristine, cfg.belt, cfg.cameras, catalogue, start_ms=0.0)
        per_product = dict.fromkeys(catalogue.ids(), 0)
        t = 0.0
        while references and min(per_product.values()) < references:
            t += 10_000.0
            for item in ref_world.schedule.items_until(t):
                pid = item.product.product_id
                if per_product[pid] >= references or item.induct_ms < t - 10_000.0:
                    continue
                per_product[pid] += 1
                for view in item_views(ref_world, item, cfg.items.crop_size, segmenters):
                    index.write(json.dumps(_write_view(out, "reference", view)) + "\n")
                    counts["references"] += 1
        t = 0.0
        while counts["items"] < items:
            t += 10_000.0
            for item in world.schedule.items_until(t):
                if item.induct_ms < t - 10_000.0 or counts["items"] >= items:
                    continue
                wrote = False
                for view in item_views(world, item, cfg.items.crop_size, segmenters):
                    index.write(json.dumps(_write_view(out, "item", view)) + "\n")
                    counts["crops"] += 1
                    wrote = True
                if wrote:
                    counts["items"] += 1
                    counts["damaged"] += item.damage is not None
    log.info("dataset_written", out=str(out), **counts)
    return counts
