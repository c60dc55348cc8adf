"""Training sets from the synthetic conveyor: item crops with labels, and pristine references.

Each item is found and cut out exactly as the node does it at run time: the
item segmenter on noisy depth, its measured box, and the tracker's crop of
the detection; ground truth only says which detection is which item. So the
models train on the crops they will see. A detection the node would not judge
(cut off by the image border, too small, or touching items it could not split)
is not written.

A split (`--split train|val|test`) draws its own product catalogue
(`edge.sim.products`), damage across the severity spectrum and the line's
nuisances; the folder keeps that catalogue as `catalogue.yaml`. The work is
shared by worker processes; the output does not depend on how many.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import multiprocessing
from collections import deque
from collections.abc import Generator, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import structlog

from edge.catalogue import Catalogue, catalogue_yaml
from edge.config import Config, ItemsConfig
from edge.durable import atomic_file, write_atomic
from edge.perception.segmentation import ItemSegmenter
from edge.perception.tracking import crop_detection, truth_of
from edge.sim.conveyor import SyntheticConveyor
from edge.sim.products import Split
from edge.sim.world import SceneItem
from edge.types import Frame, ItemCrop

log = structlog.get_logger(__name__)

#: Height PNGs store 0.1 mm per unit.
HEIGHT_UNITS_PER_MM = 10.0
#: A view showing less of the item than this (pixels) is not written.
MIN_VIEW_PIXELS = 400
#: Items handed to a worker at a time.
_CHUNK = 8
#: Items in a row that may give no view before the writer gives up.
_MAX_UNSEEN = 200
#: The node's `items.max_item_length_mm` must let the catalogue's longest item through.
_LENGTH_SLACK = 1.15

Role = Literal["item", "reference"]
#: Per item of a chunk: whether it is damaged, and the index rows of its views (none: unseen).
_Result = list[tuple[bool, list[dict[str, Any]]]]


@dataclass(frozen=True, slots=True)
class DatasetSpec:
    """What one dataset holds."""

    items: int
    seed: int
    damage_rate: float
    confounder_rate: float
    references: int  # pristine views per product, for the gallery
    split: Split | None = None
    severity_mix: tuple[float, ...] = (0.0, 0.0, 1.0)  # subtle, moderate, severe
    nuisance: float = 0.0
    touching_rate: float = 0.0


#: Per split: the spec and how many products its catalogue has. Validation and test damage
#: fewer items, as a line does; thresholds are fitted on validation, so it must be as
#: unseen as test is.
def _split_spec(split: Split, seed: int, items: int, damage_rate: float) -> DatasetSpec:
    return DatasetSpec(items=items, seed=seed, damage_rate=damage_rate, confounder_rate=0.15,
                       references=3, split=split, severity_mix=(0.4, 0.35, 0.25), nuisance=1.0,
                       touching_rate=0.03)


SPLIT_DEFAULTS: dict[Split, tuple[DatasetSpec, int]] = {
    "train": (_split_spec("train", 11, 3000, 0.5), 300),
    "val": (_split_spec("val", 22, 1500, 0.3), 150),
    "test": (_split_spec("test", 33, 2000, 0.3), 200),
}


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
    """The node's detection of `item` in `frame`, if the node would judge it."""
    for det in segmenter.detect(frame):
        truth = truth_of(det)
        if truth is None or truth.item_id != item.item_id:
            continue
        if not det.complete or det.merged or det.area_px < MIN_VIEW_PIXELS:
            return None
        crop = crop_detection(det, segmenter.plane, crop_size)
        return ItemView(item, crop, det.box_mm)
    return None


def _size(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _write_view(out: Path, role: Role, view: ItemView, split: Split | None) -> dict[str, object]:
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
        "split": split,
        "damage": truth.damage.value if truth.damage else None,
        "severity": truth.severity,
        "damage_size_mm": _size(truth.damage_size_mm),
        "damage_depth_mm": _size(truth.damage_depth_mm),
        "confounder": truth.confounder,
        "print_style": truth.print_style,
        "camera": view.crop.camera_id,
        "box_mm": [round(v, 2) for v in truth.box_mm],
        "measured_box_mm": [round(v, 2) for v in view.measured_box_mm],
        "rgb": f"crops/{stem}.png",
        "height": f"crops/{stem}_h.png",
        "mask": f"crops/{stem}_m.png",
        "damage_mask": damage_path,
    }


@dataclass(frozen=True, slots=True)
class _Plan:
    """Everything a worker needs to cut any item of either world (picklable)."""

    out: Path
    cfg: Config
    catalogue: Catalogue
    spec: DatasetSpec

    def world(self, role: Role) -> SyntheticConveyor:
        spec, syn = self.spec, self.cfg.synthetic
        syn = dataclasses.replace(
            syn, seed=spec.seed, damage_rate=spec.damage_rate,
            confounder_rate=spec.confounder_rate, touching_rate=spec.touching_rate,
            items_per_second=max(syn.items_per_second, 1.0), severity_mix=spec.severity_mix,
            nuisance=spec.nuisance, nuisance_period_ms=0.0)
        if role == "reference":  # pristine and alone, as gallery views are taken
            syn = dataclasses.replace(syn, seed=spec.seed + 1_000_003, damage_rate=0.0,
                                      confounder_rate=0.3, touching_rate=0.0)
        return SyntheticConveyor(syn, self.cfg.belt, self.cfg.cameras, self.catalogue,
                                 start_ms=0.0)

    def items_config(self) -> ItemsConfig:
        """The node's item finding, set up for this catalogue's longest item."""
        items = self.cfg.items
        longest = max((p.dims_mm[0] for p in self.catalogue.products), default=0.0)
        return dataclasses.replace(items, max_item_length_mm=max(
            items.max_item_length_mm, _LENGTH_SLACK * longest))


class _Cutter:
    """One process's worlds and segmenters."""

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan
        self._worlds: dict[Role, SyntheticConveyor] = {}
        self._segmenters: dict[str, ItemSegmenter] = {}

    def _world(self, role: Role) -> SyntheticConveyor:
        world = self._worlds.get(role)
        if world is None:
            world = self._worlds[role] = self.plan.world(role)
        if not self._segmenters:  # both worlds have the same cameras
            items_cfg = self.plan.items_config()
            self._segmenters = {c: ItemSegmenter(c, world.intrinsics(c), world.camera_pose(c),
                                                 items_cfg) for c in world.camera_ids}
        return world

    def rows(self, role: Role, indices: list[int]) -> _Result:
        """Cut and write the views of the items at `indices`."""
        world = self._world(role)
        out: _Result = []
        for index in indices:
            item = world.schedule.item(index)
            views = item_views(world, item, self.plan.cfg.items.crop_size, self._segmenters)
            out.append((item.damage is not None,
                        [_write_view(self.plan.out, role, v, self.plan.spec.split)
                         for v in views]))
        return out


_worker: _Cutter | None = None


def _init_worker(plan: _Plan) -> None:
    global _worker
    cv2.setNumThreads(1)  # one process per core already
    _worker = _Cutter(plan)


def _work(role: Role, indices: list[int]) -> _Result:
    assert _worker is not None
    return _worker.rows(role, indices)


class _Runner:
    """Cuts chunks of items in order: in this process, or in a pool of worker processes."""

    def __init__(self, plan: _Plan, workers: int) -> None:
        self._out = plan.out
        self._local = _Cutter(plan) if workers <= 1 else None
        self._pool = None if workers <= 1 else ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker, initargs=(plan,))
        self._ahead = 3 * max(1, workers)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def run(self, role: Role, chunks: Iterator[list[int]]) -> Generator[_Result, None, None]:
        """Each chunk's (damaged, rows) per item, in order. Chunks cut ahead and not taken
        when the caller stops have their files removed."""
        if self._local is not None:
            for chunk in chunks:
                yield self._local.rows(role, chunk)
            return
        assert self._pool is not None
        pending: deque[Future[_Result]] = deque()
        try:
            for chunk in chunks:
                pending.append(self._pool.submit(_work, role, chunk))
                if len(pending) >= self._ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                if not fut.cancel():
                    self.discard(fut.result())

    def discard(self, results: _Result) -> None:
        """Remove the files of items that do not go into the dataset."""
        for _, rows in results:
            for row in rows:
                for key in ("rgb", "height", "mask", "damage_mask"):
                    if row[key]:
                        (self._out / row[key]).unlink(missing_ok=True)


def _reference_indices(world: SyntheticConveyor, catalogue: Catalogue, per_product: int
                       ) -> list[int]:
    """Items of the pristine world, in order, until every product has `per_product`."""
    if not per_product or not catalogue.products:
        return []
    need = dict.fromkeys(catalogue.ids(), per_product)
    chosen: list[int] = []
    limit = 200 * len(need) * per_product + 1000
    index = 0
    while any(need.values()):
        if index >= limit:
            missing = [p for p, n in need.items() if n]
            raise RuntimeError(f"no reference items drawn for {missing[:5]} after {limit} items")
        pid = world.schedule.item(index).product.product_id
        if need.get(pid):
            need[pid] -= 1
            chosen.append(index)
        index += 1
    return chosen


def _chunks(indices: Iterator[int] | list[int]) -> Iterator[list[int]]:
    chunk: list[int] = []
    for i in indices:
        chunk.append(i)
        if len(chunk) == _CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_dataset(out: Path, cfg: Config, catalogue: Catalogue, spec: DatasetSpec, *,
                  workers: int = 1) -> dict[str, int]:
    """Write `spec.items` labelled items plus `spec.references` pristine views per product,
    and the catalogue they come from."""
    (out / "crops").mkdir(parents=True, exist_ok=True)
    header = (f"Products of the {spec.split} split (edge-node synth dataset)" if spec.split
              else "The catalogue this dataset was rendered from")
    write_atomic(out / "catalogue.yaml", catalogue_yaml(catalogue, header))
    counts = {"items": 0, "crops": 0, "references": 0, "damaged": 0}
    plan = _Plan(out, cfg, catalogue, spec)
    runner = _Runner(plan, workers)
    try:
        with atomic_file(out / "index.jsonl") as index:
            refs = _reference_indices(plan.world("reference"), catalogue, spec.references)
            for result in runner.run("reference", _chunks(refs)):
                for _, rows in result:
                    index.write("".join(json.dumps(r) + "\n" for r in rows).encode())
                    counts["references"] += len(rows)
            results = runner.run("item", _chunks(itertools.count()))
            unseen = 0  # items in a row that gave no view: a broken setup, not bad luck
            while counts["items"] < spec.items:
                result = next(results)
                for n, (damaged, rows) in enumerate(result):
                    if counts["items"] >= spec.items:
                        runner.discard(result[n:])
                        break
                    unseen = 0 if rows else unseen + 1
                    if unseen > _MAX_UNSEEN:
                        raise RuntimeError(f"{unseen} items in a row were not seen whole by "
                                           "any camera: check the cameras and the catalogue")
                    if not rows:
                        continue
                    index.write("".join(json.dumps(r) + "\n" for r in rows).encode())
                    counts["crops"] += len(rows)
                    counts["items"] += 1
                    counts["damaged"] += damaged
                    if counts["items"] % 500 == 0:
                        log.info("dataset_progress", out=str(out), **counts)
            results.close()
    finally:
        runner.close()
    log.info("dataset_written", out=str(out), split=spec.split, **counts)
    return counts
