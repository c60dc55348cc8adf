"""A site's labelled items from a snapshot export (`edge-node snapshots export`), split by item.

Needs no torch: `edge-node train` refuses data that is too thin before it loads the
training extra.

Labels follow the controller's feedback, with one rule of our own for passes:

| export line | label |
| --- | --- |
| `training_label: damaged` (`confirmed_damage`, also on a passed item) | damaged |
| `training_label: intact` (`false_positive`, `packaging_changed`) | intact |
| unreviewed pass, `kept_for: pass_sample` (nobody contradicted it) | intact |
| unreviewed pass, `kept_for: shadow_only` | left out: `unreviewed_shadow` |
| unreviewed pass without `kept_for` (an older export) | left out: `unreviewed_pass_unmarked` |
| unreviewed sideline | left out: `unreviewed_sideline` (nobody said what it was) |

A pass that a shadow candidate disagreed with is kept whatever the pass sample, and nobody is
due to audit it: that nobody contradicted it says nothing, least of all about the items the
candidate is meant to catch.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, TypeVar

import cv2
import numpy as np

from edge.audit.files import HEIGHT_UNITS_PER_MM, read_replay_crops, read_sidecar
from edge.types import ItemCrop, ItemRecord, box3

Label = Literal["damaged", "intact"]

#: The least a site must have labelled before a head is fine-tuned on it: fewer damaged items
#: teach the head nothing it can be checked on; fewer intact ones cannot place a threshold.
MIN_DAMAGED = 20
MIN_INTACT = 50
#: What the held-out split (fusion, thresholds, the comparison) must hold of each class.
MIN_HELDOUT_DAMAGED = 5
MIN_HELDOUT_INTACT = 15
#: What the training split must hold of each class.
MIN_TRAIN_EACH = 1
#: Share of the site's items held out from training, by item ID.
HELD_OUT_SHARE = 0.3


class SiteDataError(ValueError):
    """An export that cannot be trained on, or a candidate folder that cannot be written;
    the message says why and what would do."""


class _Keyed(Protocol):
    @property
    def item_id(self) -> str: ...


K = TypeVar("K", bound=_Keyed)


@dataclass(frozen=True, slots=True)
class ExportLabel:
    """An item's label as the export's index gives it (no image read)."""

    item_id: str
    label: Label


@dataclass(frozen=True, slots=True)
class SiteItem:
    """One labelled item of the site: what the node saw, and what it turned out to be."""

    record: ItemRecord
    label: Label
    decision: str  # what the node running the current models decided
    source: str  # feedback kind, or "pass" for an uncontradicted sampled pass

    @property
    def item_id(self) -> str:
        return self.record.item_id

    @property
    def damaged(self) -> bool:
        return self.label == "damaged"


@dataclass(frozen=True, slots=True)
class SiteData:
    root: Path
    items: tuple[SiteItem, ...]
    skipped: dict[str, int] = field(default_factory=dict)  # why -> items left out

    def counts(self) -> dict[str, int]:
        by = Counter(i.label for i in self.items)
        return {"damaged": by["damaged"], "intact": by["intact"]}


@dataclass(frozen=True, slots=True)
class SiteSplit(Generic[K]):
    train: tuple[K, ...]
    held_out: tuple[K, ...]


def item_bucket(item_id: str, salt: str = "split") -> float:
    """A stable number in [0, 1) per item ID. Not crc32: the snapshot store samples passes
    with crc32 of the ID (edge.audit.store.keep_passed), so a crc32 split would put every
    sampled pass on one side."""
    digest = hashlib.sha256(f"{salt}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_by_item(items: Sequence[K], held_out: float = HELD_OUT_SHARE) -> SiteSplit[K]:
    """Deterministic by item ID: both views of an item always land on the same side."""
    out = [i for i in items if item_bucket(i.item_id) < held_out]
    keep = [i for i in items if item_bucket(i.item_id) >= held_out]
    return SiteSplit(tuple(keep), tuple(out))


def label_of(line: dict[str, Any]) -> tuple[Label, str] | None:
    """(label, where it came from) of one export line; None when nobody said
    (`unlabelled_why` says which case)."""
    training = line.get("training_label")
    feedback = str(line.get("feedback") or "")
    if training in ("damaged", "intact"):
        return training, feedback or training
    if line.get("decision") == "pass" and line.get("kept_for") == "pass_sample":
        return "intact", "pass"
    return None


def unlabelled_why(line: dict[str, Any]) -> str:
    """Why an export line without a label is left out (the key it is counted under)."""
    if line.get("decision") != "pass":
        return "unreviewed_sideline"
    if line.get("kept_for") == "shadow_only":
        return "unreviewed_shadow"
    return "unreviewed_pass_unmarked"


def check_out(out: Path) -> None:
    """SiteDataError unless `out` can become the candidate folder (new, or empty)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SiteDataError(f"{out} exists and is not empty: give a new folder for the "
                            "candidate")


def _image(path: Path, flags: int) -> np.ndarray:
    img = cv2.imread(str(path), flags)
    if img is None:
        raise OSError(f"{path}: missing or not an image")
    return img


def _crop(folder: Path, cam: str, files: dict[str, Any], has_depth: bool) -> ItemCrop:
    color = _image(folder / str(files["color"]), cv2.IMREAD_COLOR)
    raw = _image(folder / str(files["height"]), cv2.IMREAD_UNCHANGED)
    mask = _image(folder / str(files["mask"]), cv2.IMREAD_GRAYSCALE) > 0
    height = raw.astype(np.float32) / np.float32(HEIGHT_UNITS_PER_MM)
    return ItemCrop(camera_id=cam, color=color, height_mm=height, mask=mask,
                    has_depth=has_depth and bool((height > 0).any()))


def _crops(folder: Path, sidecar: dict[str, Any]) -> dict[str, ItemCrop]:
    """The crops exactly as the models saw them (heights from the snapshot's replay arrays);
    for a snapshot from before those were kept, heights from its PNG (0.1 mm steps)."""
    views = dict(sidecar.get("views") or {})
    try:
        return read_replay_crops(folder, views)
    except (OSError, ValueError, KeyError):
        return {cam: _crop(folder, cam, view, bool(view.get("has_depth", True)))
                for cam, view in sorted(views.items())}


def _record(n: int, line: dict[str, Any], folder: Path) -> ItemRecord:
    sidecar = read_sidecar(folder)
    item = sidecar.get("item") or {}
    crops = _crops(folder, sidecar)
    box = box3(v if v is not None else 0.0 for v in item.get("box_mm") or (0.0, 0.0, 0.0))
    product = line.get("product_id")
    return ItemRecord(track_id=n, item_id=str(line["item_id"]),
                      product_id=None if product is None else str(product), first_seen_ms=0.0,
                      captured_ms=0.0, deadline_ms=1e12, box_mm=box, centre_mm=(0.0, 0.0),
                      crops=crops)


def _index(root: Path) -> list[dict[str, Any]]:
    """The export's lines, one per item: an item exported twice counts once, newest line."""
    index = root / "index.jsonl"
    try:
        lines = index.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise SiteDataError(f"{index}: cannot be read ({exc}); export the snapshots with "
                            "`edge-node snapshots export --out DIR`") from None
    latest: dict[str, dict[str, Any]] = {}
    for n, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
            latest[str(line["item_id"])] = line
        except (ValueError, KeyError, TypeError) as exc:
            raise SiteDataError(f"{index}:{n}: not an export line ({exc!r})") from None
    return list(latest.values())


def export_labels(root: Path) -> list[ExportLabel]:
    """The labelled items of an export from its index alone (no image read: a quick check)."""
    out: list[ExportLabel] = []
    for line in _index(root):
        labelled = label_of(line)
        if labelled is not None and line.get("views"):
            out.append(ExportLabel(str(line["item_id"]), labelled[0]))
    return out


def load_export(root: Path) -> SiteData:
    """Every labelled item of an export folder (`DIR/index.jsonl` and `DIR/<snapshot>/`)."""
    items: list[SiteItem] = []
    skipped: Counter[str] = Counter()
    for n, line in enumerate(_index(root)):
        labelled = label_of(line)
        if labelled is None:
            skipped[unlabelled_why(line)] += 1
            continue
        if not line.get("views"):
            skipped["no_views"] += 1
            continue
        try:
            record = _record(n, line, root / str(line["snapshot_id"]))
        except (OSError, ValueError, KeyError, TypeError):
            skipped["unreadable"] += 1
            continue
        items.append(SiteItem(record, labelled[0], str(line.get("decision")), labelled[1]))
    return SiteData(root, tuple(items), dict(skipped))


class _Labelled(_Keyed, Protocol):
    @property
    def label(self) -> Label: ...


def check_labels(root: Path, items: Sequence[_Labelled],
                 held_out: float = HELD_OUT_SHARE) -> None:
    """SiteDataError unless there is enough of each class to train on and to judge by
    (`items`: labelled items, split as `split_by_item` splits them)."""
    have = Counter(i.label for i in items)
    if have["damaged"] < MIN_DAMAGED or have["intact"] < MIN_INTACT:
        raise SiteDataError(
            f"{root}: {have['damaged']} damaged and {have['intact']} intact labelled items; "
            f"fine-tuning needs at least {MIN_DAMAGED} damaged and {MIN_INTACT} intact "
            "(confirmed_damage and false_positive feedback, and sampled passes): label more "
            "snapshots, or export a longer period")
    split = split_by_item(items, held_out)
    held = Counter(i.label for i in split.held_out)
    trained = Counter(i.label for i in split.train)
    if held["damaged"] < MIN_HELDOUT_DAMAGED or held["intact"] < MIN_HELDOUT_INTACT:
        raise SiteDataError(
            f"{root}: the held-out split ({held_out:.0%} of the items, by item ID) has "
            f"{held['damaged']} damaged and {held['intact']} intact items; fitting the "
            f"thresholds and judging the candidate need at least {MIN_HELDOUT_DAMAGED} damaged "
            f"and {MIN_HELDOUT_INTACT} intact there: label more snapshots")
    if trained["damaged"] < MIN_TRAIN_EACH or trained["intact"] < MIN_TRAIN_EACH:
        only = "intact" if trained["intact"] else "damaged"
        raise SiteDataError(
            f"{root}: the training split ({1 - held_out:.0%} of the items, by item ID) holds "
            f"only {only} items ({trained['damaged']} damaged, {trained['intact']} intact); "
            f"fine-tuning needs at least {MIN_TRAIN_EACH} of each there: label more snapshots")
