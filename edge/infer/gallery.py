"""`ReferenceGallery`: per product and camera, patch features of pristine reference views.

The anomaly score of a crop is how far its patches lie from the nearest
reference patch of the same product and camera: per-patch nearest-neighbour
distance gives an anomaly map, the mean of its top-k the score. Each patch
feature carries its (weighted) position in the crop, so a patch is matched
against reference patches near the same place: a missing unit of a
multipack (belt where a unit should be) stands out even though belt patches
exist elsewhere in the references. Damage-like prints that the references
show match themselves and are not flagged.

The gallery persists under its directory (one `.npz` per product and
camera, written atomically) and learns at run time (`add`), e.g. when the
controller reports "false positive: packaging changed".
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import structlog

from edge.types import F32Array

log = structlog.get_logger(__name__)

#: Weight of the (x, y) position appended to the unit-norm patch features.
POSITION_WEIGHT = 0.35
#: Patches kept per product and camera (random subsample beyond this).
MAX_PATCHES = 6144
TOP_K = 6
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def _safe(name: str) -> str:
    return _SAFE.sub("_", name) or "_"


def with_position(patches: F32Array) -> F32Array:
    """(C, H, W) features -> (H*W, C+2) rows with the weighted position appended."""
    c, h, w = patches.shape
    ys, xs = np.meshgrid(np.linspace(-1, 1, h, dtype=np.float32),
                         np.linspace(-1, 1, w, dtype=np.float32), indexing="ij")
    rows = np.empty((h * w, c + 2), dtype=np.float32)
    rows[:, :c] = patches.reshape(c, h * w).T
    rows[:, c] = xs.ravel() * POSITION_WEIGHT
    rows[:, c + 1] = ys.ravel() * POSITION_WEIGHT
    return rows


@dataclass(frozen=True, slots=True)
class AnomalyResult:
    score: float
    patch_map: F32Array  # (H, W) nearest-neighbour distance per patch


@dataclass(slots=True)
class _Bank:
    rows: F32Array  # (M, D)
    sq_norms: F32Array  # (M,)
    views: int


class ReferenceGallery:
    """Reference patch banks keyed by (product ID, camera ID), persisted in `root`."""

    def __init__(self, root: Path | None, *, max_patches: int = MAX_PATCHES, top_k: int = TOP_K,
                 seed: int = 0) -> None:
        self.root = root  # None: in memory only (golden self-test, threshold fitting)
        self.max_patches = max_patches
        self.top_k = top_k
        self._rng = np.random.default_rng(seed)
        self._banks: dict[tuple[str, str], _Bank] = {}
        self._unsaved: set[tuple[str, str]] = set()  # learned, but the write failed
        self._learned: set[tuple[str, str]] = set()  # learned during a reload's disk read
        self._warned: set[tuple[str, str]] = set()  # banks said to be of another model
        self._lock = threading.Lock()
        self._load()

    def _file(self, root: Path, product_id: str, camera_id: str) -> Path:
        return root / _safe(product_id) / f"{_safe(camera_id)}.npz"

    def _read(self, unreadable: set[Path] | None = None) -> dict[tuple[str, str], _Bank]:
        """The banks on disk; the paths of files that could not be read go to `unreadable`."""
        banks: dict[tuple[str, str], _Bank] = {}
        if self.root is None or not self.root.is_dir():
            return banks
        for path in sorted(self.root.glob("*/*.npz")):
            try:
                with np.load(path, allow_pickle=False) as data:
                    rows = data["rows"].astype(np.float32)
                    key = (str(data["product_id"]), str(data["camera_id"]))
                    views = int(data["views"])
            except Exception as exc:  # empty, truncated, not a zip: skip that file
                # A half-written or half-copied file must cost its own references only, not
                # the start of the node or a reload.
                log.warning("gallery_file_unreadable", path=str(path),
                            error=f"{type(exc).__name__}: {exc}")
                if unreadable is not None:
                    unreadable.add(path)
                continue
            if rows.ndim != 2 or not len(rows):
                log.warning("gallery_file_unreadable", path=str(path),
                            error=f"rows of shape {rows.shape}")
                if unreadable is not None:
                    unreadable.add(path)
                continue
            banks[key] = _Bank(rows, np.einsum("ij,ij->i", rows, rows), views)
        return banks

    def _load(self) -> None:
        self._banks = self._read()
        log.info("gallery_loaded", root=str(self.root), banks=len(self._banks))

    def reload(self) -> dict[str, int]:
        """Re-read the banks from disk (SIGHUP: references copied in or removed by hand).

        The files are the truth, except for banks whose last write failed: those stay as
        learned. A root that is not a directory (any more) changes nothing. Returns how many
        banks were added, changed, removed and kept unsaved.
        """
        if self.root is None:
            return {"added": 0, "changed": 0, "removed": 0, "unsaved": 0}
        if not self.root.is_dir():  # unmounted or mistyped: forgetting every product is worse
            log.warning("gallery_reload_skipped", root=str(self.root), why="not a directory")
            return {"added": 0, "changed": 0, "removed": 0, "unsaved": len(self._unsaved)}
        with self._lock:
            self._learned.clear()
        unreadable: set[Path] = set()
        fresh = self._read(unreadable)  # outside the lock: scoring and learning go on
        root = self.root
        with self._lock:
            old = self._banks
            # Learned while the files were read: memory is newer than what was read. A file
            # that cannot be read now (a copy in progress) is no reason to forget its bank.
            unsaved = {k: old[k] for k in old if k in self._unsaved or k in self._learned
                       or self._file(root, *k) in unreadable}
            counts = {
                "added": sum(1 for k in fresh if k not in old),
                "changed": sum(1 for k in fresh if k in old and k not in unsaved
                               and (old[k].views != fresh[k].views
                                    or old[k].rows.shape != fresh[k].rows.shape)),
                "removed": sum(1 for k in old if k not in fresh and k not in unsaved),
                "unsaved": len(unsaved),
            }
            self._banks = {**fresh, **unsaved}
        log.info("gallery_reloaded", root=str(self.root), banks=len(self._banks), **counts)
        return counts

    def products(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(sorted({p for p, _ in self._banks}))

    def has(self, product_id: str | None, camera_id: str | None = None) -> bool:
        if product_id is None:
            return False
        with self._lock:
            if camera_id is not None:
                return (product_id, camera_id) in self._banks
            return any(p == product_id for p, _ in self._banks)

    def views(self, product_id: str, camera_id: str) -> int:
        with self._lock:
            bank = self._banks.get((product_id, camera_id))
            return bank.views if bank else 0

    def is_empty(self) -> bool:
        with self._lock:
            return not self._banks

    def add(self, product_id: str, camera_id: str, patches: F32Array, *, views: int = 1,
            persist: bool = True) -> None:
        """Add reference patch features: (C, H, W) or a stack (K, C, H, W) of views."""
        stack = patches[None] if patches.ndim == 3 else patches
        new = np.concatenate([with_position(p) for p in stack])
        with self._lock:
            old = self._banks.get((product_id, camera_id))
            if old is not None and old.rows.shape[1] != new.shape[1]:
                old = None  # another embedding model's references: start the bank anew
            rows = new if old is None else np.concatenate([old.rows, new])
            if len(rows) > self.max_patches:
                keep = self._rng.choice(len(rows), self.max_patches, replace=False)
                rows = rows[np.sort(keep)]
            total = views + (old.views if old else 0)
            self._banks[(product_id, camera_id)] = _Bank(
                rows, np.einsum("ij,ij->i", rows, rows), total)
            self._learned.add((product_id, camera_id))
        if persist and self.root is not None:
            try:
                self._save(self.root, product_id, camera_id, rows, total)
                with self._lock:
                    self._unsaved.discard((product_id, camera_id))
            except OSError as exc:  # keep learning in memory; the next add retries the write
                with self._lock:
                    self._unsaved.add((product_id, camera_id))
                log.error("gallery_write_failed", product_id=product_id, camera=camera_id,
                          root=str(self.root), error=str(exc))
        log.info("gallery_learned", product_id=product_id, camera=camera_id, views=total,
                 patches=len(rows))

    def _other_model(self, product_id: str, camera_id: str, bank_dim: int,
                     model_dim: int) -> None:
        with self._lock:
            if (product_id, camera_id) in self._warned:
                return
            self._warned.add((product_id, camera_id))
        log.warning("gallery_bank_other_model", product_id=product_id, camera=camera_id,
                    bank_dim=bank_dim, model_dim=model_dim,
                    hint="references from another embedding model are not used; feedback "
                    "(packaging_changed) or a new gallery rebuilds them")

    def _save(self, root: Path, product_id: str, camera_id: str, rows: F32Array,
              views: int) -> None:
        path = self._file(root, product_id, camera_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as fh:
            np.savez(fh, rows=rows.astype(np.float16), product_id=np.str_(product_id),
                     camera_id=np.str_(camera_id), views=np.int64(views))
            fh.flush()
            os.fsync(fh.fileno())  # a power cut must not leave an empty file under the name
        tmp.replace(path)

    def score(self, product_id: str, camera_id: str, patches: F32Array) -> AnomalyResult | None:
        """Anomaly of one crop's (C, H, W) patches; None without references."""
        with self._lock:
            bank = self._banks.get((product_id, camera_id))
        if bank is None:
            return None
        _, h, w = patches.shape
        q = with_position(patches)
        if q.shape[1] != bank.rows.shape[1]:
            # References from another embedding model: scoring against them is meaningless.
            # The item is judged without the gallery (no_gallery), not dropped with its batch.
            self._other_model(product_id, camera_id, bank.rows.shape[1], q.shape[1])
            return None
        dist = nearest_sq_distance(q, bank.rows, bank.sq_norms)
        per_patch = np.sqrt(dist).reshape(h, w)
        k = min(self.top_k, per_patch.size)
        top = np.partition(per_patch.ravel(), per_patch.size - k)[-k:]
        return AnomalyResult(float(top.mean()), per_patch.astype(np.float32))


def nearest_sq_distance(query: F32Array, bank: F32Array,
                        bank_sq: npt.NDArray[np.float32] | None = None) -> F32Array:
    """Squared Euclidean distance from each query row to its nearest bank row."""
    bsq = np.einsum("ij,ij->i", bank, bank) if bank_sq is None else bank_sq
    qsq = np.einsum("ij,ij->i", query, query)
    # max over (2 q.b - |b|^2) is one GEMM plus a row reduction.
    best = ((2.0 * query) @ bank.T - bsq[None, :]).max(axis=1)
    out: F32Array = np.maximum(qsq - best, 0.0).astype(np.float32)
    return out
