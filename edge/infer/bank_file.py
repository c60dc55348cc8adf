"""One reference-gallery bank on disk: a product's and camera's patch rows per embedding
model, and the reference views they were computed from (`edge.infer.gallery` says why)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.durable import atomic_file
from edge.types import F32Array, U8Array

#: Embedding models whose rows a bank file keeps: the one in use and the one before it (a
#: rollback of a model update finds its features without re-embedding).
MODELS_KEPT = 2

_SAFE = re.compile(r"[^A-Za-z0-9._-]")

_VIEW_KEY = "view_"

def safe_name(name: str) -> str:
    return _SAFE.sub("_", name) or "_"

def rows_key(model: str) -> str:
    return f"rows__{safe_name(model)}"

@dataclass(slots=True)
class BankFile:
    """What a bank file holds (see `edge.infer.gallery`)."""

    key: tuple[str, str]
    views: int
    rows: dict[str | None, F32Array]  # per model, the newest first; None: not recorded
    legacy: dict[str, np.ndarray]  # `rows` (and `model`) as older releases wrote them
    images: list[U8Array]

def read_bank_file(path: Path, *, images: bool = False) -> BankFile:
    """Parse a bank file (raises on a damaged one); views only with `images`."""
    with np.load(path, allow_pickle=False) as data:
        files = set(data.files)
        key = (str(data["product_id"]), str(data["camera_id"]))
        rows: dict[str | None, F32Array] = {}
        for model in (data["models"].tolist() if "models" in files else []):
            rows[str(model)] = data[rows_key(str(model))].astype(np.float32)
        legacy = {k: data[k] for k in ("rows", "model") if k in files}
        if "rows" in legacy:
            old_model = str(legacy["model"]) if "model" in legacy else None
            rows.setdefault(old_model, legacy["rows"].astype(np.float32))
        kept = [np.asarray(data[k], dtype=np.uint8)
                for k in sorted(k for k in files if k.startswith(_VIEW_KEY))] if images else []
        return BankFile(key, int(data["views"]), rows, legacy, kept)

def stored_images(path: Path) -> list[U8Array]:
    """The reference views kept in a bank file ([] if none or unreadable)."""
    try:
        return read_bank_file(path, images=True).images
    except Exception:  # missing or damaged: its views are gone, the caller says what then
        return []


def write_bank_file(path: Path, key: tuple[str, str], rows: F32Array, views: int,
                    model: str | None, images: Sequence[U8Array],
                    on_disk: BankFile | None) -> None:
    """Write a bank's `rows` (of embedding `model`) with its views, keeping the newest other
    model's rows and the rows of older releases' format from the file it replaces."""
    product_id, camera_id = key
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {
        "product_id": np.str_(product_id), "camera_id": np.str_(camera_id),
        "views": np.int64(views)}
    models: list[str] = []
    if model is not None:
        models.append(model)
        arrays[rows_key(model)] = rows.astype(np.float16)
    else:  # not checked (no model given): written as older releases read it
        arrays["rows"] = rows.astype(np.float16)
    if on_disk is not None:
        for other, other_rows in on_disk.rows.items():
            if other is not None and other not in models and len(models) < MODELS_KEPT:
                models.append(other)
                arrays[rows_key(other)] = other_rows.astype(np.float16)
        if model is not None:
            arrays.update(on_disk.legacy)
    arrays["models"] = np.array(models, dtype=np.str_)
    for i, img in enumerate(images):
        arrays[f"{_VIEW_KEY}{i:03d}"] = np.ascontiguousarray(img, dtype=np.uint8)
    # Durable, and a temporary name of its own: another gallery (a reload's, a doctor's)
    # may write this bank too.
    with atomic_file(path) as fh:
        np.savez(fh, **arrays)
