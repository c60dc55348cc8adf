"""What a snapshot keeps so that its item can be judged again (`edge-node replay`).

The crops themselves are in the snapshot's files (`edge.audit.files.read_replay_crops`);
the sidecar's ``replay`` block says what judged them: the manifest (path, version,
thresholds version, sha256 of the file as loaded), the backend, the decision settings, the
BLAS threads (the gallery search's sums round by how they are split) and the gallery (its
folder, and per view how many reference views the product's bank held). `ModelContext`
builds that block on the inference thread as the item is decided (under the batch lock: it
names the models of the item's own batch, a reload switches models between batches); the
block travels with the item to the snapshot store and to the shadow scorer.
`load_stored_item` reads a snapshot back into the `ItemRecord` the models saw.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from edge.audit.files import read_replay_crops, read_sidecar
from edge.config import DecisionConfig, config_to_mapping
from edge.infer.inspector import ItemInspector
from edge.types import ItemRecord

log = structlog.get_logger(__name__)

#: Version of the sidecar's ``replay`` block.
REPLAY_SCHEMA = 1


class ModelContext:
    """The ``replay`` block of an item's snapshot: the running inspector's models, now."""

    def __init__(self, inspector: ItemInspector, decision: DecisionConfig) -> None:
        self._inspector = inspector
        self._decision = config_to_mapping(decision)

    def __call__(self, record: ItemRecord) -> dict[str, Any]:
        """The block; never raises (it runs beside the verdict): what cannot be read is
        recorded as unknown, and that snapshot is then not replayable."""
        try:
            return self._block(record)
        except Exception as exc:
            log.exception("replay_context_failed", item_id=record.item_id)
            return {"schema": REPLAY_SCHEMA, "unknown": f"{type(exc).__name__}: {exc}"}

    def _block(self, record: ItemRecord) -> dict[str, Any]:
        inspector = self._inspector
        manifest = inspector.manifest
        gallery = inspector.gallery
        pid = record.product_id
        return {
            "schema": REPLAY_SCHEMA,
            "manifest": {"path": str(manifest.path), "version": manifest.version,
                         "sha256": manifest.sha256,
                         "threshold_version": manifest.threshold_version,
                         "model_versions": manifest.model_versions()},
            "backend": {"name": inspector.embedding.name,
                        "providers": list(getattr(inspector.embedding, "providers", []))},
            "gallery": {"model": gallery.model,
                        "dir": None if gallery.root is None else str(gallery.root),
                        "views": {} if pid is None else {
                            cam: gallery.views(pid, cam) for cam in sorted(record.crops)}},
            "decision": self._decision,
            "blas_threads": blas_threads(),
        }


def blas_threads() -> str | None:
    """The BLAS threads this process runs with, as set (`edge.app.process.tune_process`)."""
    return os.environ.get("OPENBLAS_NUM_THREADS")


class NotReplayableError(ValueError):
    """A snapshot that lacks what a replay needs (older, or damaged)."""


@dataclass(frozen=True, slots=True)
class StoredItem:
    """One snapshot, read back: the item as the models saw it and what they said."""

    snapshot_id: str
    path: Path
    record: ItemRecord
    verdict: Mapping[str, Any]  # the sidecar's verdict (`edge.audit.files.verdict_json`)
    replay: Mapping[str, Any]  # the sidecar's replay block (`ModelContext`)
    shadow: Mapping[str, Any] | None  # a shadow disagreement's block, if any
    label: Mapping[str, Any] | None  # controller feedback, if any

    @property
    def manifest_sha256(self) -> str:
        return str(self.replay["manifest"]["sha256"])

    def scored_on_cpu(self) -> bool:
        """Scored on ONNX Runtime's CPU provider, as replay scores: comparable bit for bit."""
        backend = self.replay.get("backend") or {}
        return (backend.get("name") == "onnxruntime"
                and list(backend.get("providers") or []) == ["CPUExecutionProvider"])


def _float(value: object) -> float:
    return math.nan if value is None else float(value)  # type: ignore[arg-type]


def _record(item: Mapping[str, Any], crops: Mapping[str, Any]) -> ItemRecord:
    box = [_float(v) for v in item["box_mm"]]
    centre = [_float(v) for v in item["centre_mm"]]
    return ItemRecord(
        track_id=int(item["track_id"]), item_id=str(item["item_id"]),
        product_id=None if item["product_id"] is None else str(item["product_id"]),
        first_seen_ms=_float(item["first_seen_ms"]), captured_ms=_float(item["captured_ms"]),
        deadline_ms=_float(item["deadline_ms"]), box_mm=(box[0], box[1], box[2]),
        centre_mm=(centre[0], centre[1]), crops=dict(crops),
        views_missing=tuple(str(v) for v in item["views_missing"]),
        merged=bool(item["merged"]), unannounced=bool(item["unannounced"]))


def load_stored_item(snapshot_dir: Path) -> StoredItem:
    """The snapshot in `snapshot_dir`, read back for a replay; `NotReplayableError` says why
    it cannot be (no replay block, files missing or damaged, not judged by the models)."""
    try:
        data = read_sidecar(snapshot_dir)
    except (OSError, ValueError) as exc:
        raise NotReplayableError(f"no readable sidecar ({exc})") from None
    replay = data.get("replay")
    if not isinstance(replay, dict) or replay.get("schema") != REPLAY_SCHEMA:
        raise NotReplayableError("taken without replay data (by an older release, or by a "
                                 "store that did not know the models)")
    if "unknown" in replay:
        raise NotReplayableError(f"what judged it could not be recorded ({replay['unknown']})")
    if data["verdict"].get("scores") is None:
        raise NotReplayableError("not judged by the models (fail-safe verdict)")
    try:
        crops = read_replay_crops(snapshot_dir, data["views"])
        record = _record(data["item"], crops)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise NotReplayableError(f"its files cannot be read ({type(exc).__name__}: {exc})"
                                 ) from None
    return StoredItem(str(data.get("snapshot_id") or snapshot_dir.name), snapshot_dir, record,
                      data["verdict"], replay, data.get("shadow"), data.get("label"))

