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

Patch features only mean something to the embedding model that computed
them, so a bank file holds rows per model (`rows__<model>`, the models
listed in `models`, the newest first; up to `bank_file.MODELS_KEPT`) and the reference
views it was built from (up to `MAX_VIEWS` crops). A gallery opened for a
model the file has no rows of sets the bank aside (`stale`): it is not
scored, and the inspector re-embeds its views with the model in use. A model
update with the same feature size would otherwise score items against the old
model's features: meaningless distances, silently. The older model's rows
stay, so a rollback finds them; files from before models were recorded keep
their `rows` as they were (older releases read only those).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import structlog

from edge.infer.bank_file import (
    BankFile,
    read_bank_file,
    safe_name,
    stored_images,
    write_bank_file,
)
from edge.types import F32Array, U8Array

log = structlog.get_logger(__name__)

#: Weight of the (x, y) position appended to the unit-norm patch features.
POSITION_WEIGHT = 0.35
#: Patches kept per product and camera (random subsample beyond this).
MAX_PATCHES = 6144
TOP_K = 6
#: Reference views (crops) kept per product and camera for re-embedding; the latest win.
MAX_VIEWS = 32
#: Learning steps remembered for a reload prepared meanwhile (see `learned_since`).
JOURNAL_KEPT = 64


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
    model: str | None  # the embedding model's identity; None: not recorded (older files)


def _bank(rows: F32Array, views: int, model: str | None) -> _Bank:
    return _Bank(rows, np.einsum("ij,ij->i", rows, rows), views, model)


class ReferenceGallery:
    """Reference patch banks keyed by (product ID, camera ID), persisted in `root`.

    `model` names the embedding model whose features this gallery holds (None: not
    checked). Banks on disk of another model are `stale`: set aside, not scored.
    """

    def __init__(self, root: Path | None, *, model: str | None = None,
                 adopt_unrecorded: bool = False, max_patches: int = MAX_PATCHES,
                 top_k: int = TOP_K, seed: int = 0) -> None:
        self.root = root  # None: in memory only (golden self-test, threshold fitting)
        self.model = model
        # Banks from before models were recorded: taken as `model`'s (the node's start: the
        # model it ran with is the likeliest), or else stale (a model change).
        self._adopt = adopt_unrecorded
        self.max_patches = max_patches
        self.top_k = top_k
        self._rng = np.random.default_rng(seed)
        self._banks: dict[tuple[str, str], _Bank] = {}
        self._unsaved: set[tuple[str, str]] = set()  # learned, not written (yet, or failed)
        self._learned: set[tuple[str, str]] = set()  # learned during a reload's disk read
        self._warned: set[tuple[str, str]] = set()  # banks said to be of another model
        # Banks on disk made by another embedding model: not scored until re-embedded.
        self._stale: dict[tuple[str, str], str | None] = {}
        # Views of banks whose file is not written yet (a failed write, or `persist=False`),
        # and whether they replace the views on disk or add to them.
        self._pending: dict[tuple[str, str], tuple[list[U8Array], bool]] = {}
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # a read-modify-write of a file at a time
        # What was learned with views, the latest JOURNAL_KEPT in order (for a gallery
        # prepared beside this one); `_journal_base` entries were dropped before them.
        self._journal: list[tuple[tuple[str, str], list[U8Array]]] = []
        self._journal_base = 0
        self._load()

    def for_model(self, model: str | None) -> ReferenceGallery:
        """The same directory opened for another embedding model (a reload that changes
        it): every bank without that model's rows is stale there until re-embedded, and
        views this gallery holds but has not written yet are carried over to re-embed."""
        other = ReferenceGallery(self.root, model=model, max_patches=self.max_patches,
                                 top_k=self.top_k)
        with self._lock:
            unwritten = {k: list(self._pending.get(k, ([], False))[0]) for k in self._unsaved}
        for key, images in unwritten.items():
            if images and not other.has(*key):
                other._carry(key, images, self.model)
        return other

    def _carry(self, key: tuple[str, str], images: list[U8Array], model: str | None) -> None:
        with self._lock:
            pending, replaced = self._pending.get(key, ([], False))
            self._pending[key] = (pending + images, replaced)
            self._stale.setdefault(key, model)

    def journal_mark(self) -> int:
        """A position in the learning journal (see `learned_since`)."""
        with self._lock:
            return self._journal_base + len(self._journal)

    def learned_since(self, mark: int) -> list[tuple[tuple[str, str], list[U8Array]]]:
        """Views learned (not re-embedded) since `journal_mark` returned `mark`."""
        with self._lock:
            return list(self._journal[max(0, mark - self._journal_base):])

    def _file(self, root: Path, product_id: str, camera_id: str) -> Path:
        return root / safe_name(product_id) / f"{safe_name(camera_id)}.npz"

    def _read(self, unreadable: set[Path] | None = None
              ) -> tuple[dict[tuple[str, str], _Bank], dict[tuple[str, str], str | None]]:
        """The banks on disk with rows of this gallery's model, and the others (stale: the
        newest model they have rows of); the paths of files that could not be read go to
        `unreadable`."""
        banks: dict[tuple[str, str], _Bank] = {}
        stale: dict[tuple[str, str], str | None] = {}
        if self.root is None or not self.root.is_dir():
            return banks, stale
        for path in sorted(self.root.glob("*/*.npz")):
            try:
                bank_file = read_bank_file(path)
                key, rows_by_model = bank_file.key, bank_file.rows
                if not rows_by_model or any(r.ndim != 2 or not len(r)
                                            for r in rows_by_model.values()):
                    raise ValueError("no rows of any model")
            except Exception as exc:  # empty, truncated, not a zip: skip that file
                # A half-written or half-copied file must cost its own references only, not
                # the start of the node or a reload.
                log.warning("gallery_file_unreadable", path=str(path),
                            error=f"{type(exc).__name__}: {exc}")
                if unreadable is not None:
                    unreadable.add(path)
                continue
            if self.model is None:  # not checked: the newest rows
                model, rows = next(iter(rows_by_model.items()))
                banks[key] = _bank(rows, bank_file.views, model)
            elif self.model in rows_by_model:
                banks[key] = _bank(rows_by_model[self.model], bank_file.views, self.model)
            elif None in rows_by_model and self._adopt:
                banks[key] = _bank(rows_by_model[None], bank_file.views, None)
            else:
                stale[key] = next(iter(rows_by_model))
        return banks, stale

    def _load(self) -> None:
        self._banks, self._stale = self._read()
        if self.model is not None:
            # Banks from before models were recorded are taken as this model's, and say so
            # from now on: the next model change must find them stale.
            for key, bank in self._banks.items():
                if bank.model is None:
                    bank.model = self.model
                    self._unsaved.add(key)  # written by the next `flush`
        log.info("gallery_loaded", root=str(self.root), banks=len(self._banks),
                 stale=len(self._stale), model=self.model)

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
        self._adopt = False  # adoption is for the start only: copied-in files may be any model's
        fresh, stale = self._read(unreadable)  # outside the lock: scoring and learning go on
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
            self._stale = {k: m for k, m in stale.items() if k not in self._banks}
        log.info("gallery_reloaded", root=str(self.root), banks=len(self._banks),
                 stale=len(self._stale), **counts)
        return counts

    def stale(self) -> dict[tuple[str, str], str | None]:
        """Banks on disk made by another embedding model (key -> that model)."""
        with self._lock:
            return dict(self._stale)

    def stored_views(self, product_id: str, camera_id: str) -> list[U8Array]:
        """The reference views (BGR crops) a bank was built from, as far as kept."""
        key = (product_id, camera_id)
        with self._lock:
            pending, replaces = self._pending.get(key, ([], False))
        if replaces or self.root is None:
            return list(pending)
        return stored_images(self._file(self.root, *key)) + pending

    def forget_stale(self, product_id: str, camera_id: str) -> None:
        """Stop listing a stale bank that cannot be rebuilt (its file stays for an operator)."""
        with self._lock:
            self._stale.pop((product_id, camera_id), None)

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
            images: Sequence[U8Array] = (), persist: bool = True,
            replace: bool = False) -> None:
        """Add reference patch features: (C, H, W) or a stack (K, C, H, W) of views.

        `images` are the views themselves (BGR crops), kept with the bank so that another
        embedding model can re-embed them. `replace` starts the bank anew (re-embedding):
        `images` are then all of its views. Without `persist` the bank waits in memory
        for `flush`.
        """
        key = (product_id, camera_id)
        stack = patches[None] if patches.ndim == 3 else patches
        new = np.concatenate([with_position(p) for p in stack])
        with self._lock:
            old = None if replace else self._banks.get(key)
            if old is not None and old.rows.shape[1] != new.shape[1]:
                old = None  # another embedding model's references: start the bank anew
            rows = new if old is None else np.concatenate([old.rows, new])
            if len(rows) > self.max_patches:
                keep = self._rng.choice(len(rows), self.max_patches, replace=False)
                rows = rows[np.sort(keep)]
            total = views + (old.views if old else 0)
            self._banks[key] = _bank(rows, total, self.model)
            self._stale.pop(key, None)
            self._warned.discard(key)
            self._learned.add(key)
            if images and not replace:
                self._journal.append((key, list(images)))
                if len(self._journal) > JOURNAL_KEPT:  # far more than a reload ever needs
                    del self._journal[0]
                    self._journal_base += 1
            if self.root is not None:  # in memory only, nothing will re-embed them
                pending, replaced = self._pending.get(key, ([], False))
                self._pending[key] = ((list(images) if replace else pending + list(images)),
                                      replace or replaced)
                self._unsaved.add(key)
        if persist and self.root is not None:
            self._write(key)
        log.info("gallery_learned", product_id=product_id, camera=camera_id, views=total,
                 patches=len(rows), model=self.model)

    def flush(self) -> int:
        """Write every bank that waits in memory; returns how many are still unwritten."""
        with self._lock:
            keys = sorted(self._unsaved)
        for key in keys:
            self._write(key)
        with self._lock:
            return len(self._unsaved)

    def _write(self, key: tuple[str, str]) -> None:
        """Write one bank with its views; on failure it stays in memory (retried on the
        next add or flush) and the error is logged."""
        root = self.root
        if root is None:
            return
        with self._write_lock:
            with self._lock:
                bank = self._banks.get(key)
                pending, replaces = self._pending.get(key, ([], False))
            if bank is None:
                return
            path = self._file(root, *key)
            try:
                try:
                    on_disk: BankFile | None = read_bank_file(path, images=True)
                except Exception:  # none yet, or damaged: nothing of it to keep
                    on_disk = None
                kept = pending if replaces or on_disk is None else on_disk.images + pending
                write_bank_file(path, key, bank.rows, bank.views, bank.model, kept[-MAX_VIEWS:],
                                on_disk)
            except OSError as exc:  # keep learning in memory; the next add retries the write
                log.error("gallery_write_failed", product_id=key[0], camera=key[1],
                          root=str(root), error=str(exc))
                return
            with self._lock:
                if self._banks.get(key) is bank:
                    self._unsaved.discard(key)
                    self._pending.pop(key, None)
                    return
                # Learned again meanwhile: that write is still due, with only the views
                # added since on top of what is on disk now (unless it started anew).
                now = self._pending.get(key, ([], False))[0]
                if len(now) >= len(pending) and all(
                        a is b for a, b in zip(now, pending, strict=False)):
                    self._pending[key] = (now[len(pending):], False)

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
