"""The item inspector: crops in, scores out (classifier, gallery anomaly, geometry, fusion).

Two ONNX models share one frozen backbone: `embedding` (RGB crop -> patch
features for the gallery, stride-16 trunk features and, in models that have them,
the out-of-distribution signals `parcel` and `novelty`: edge/infer/ood.py) and
`damage` (trunk features + a depth branch -> damage probability and per-type
probabilities with their coarse maps). Crops are BGR (as cameras and OpenCV give
them) and are converted to the channel order the manifest names while they are
copied into preallocated batch buffers.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import structlog

from edge.catalogue import Catalogue
from edge.config import ModelsConfig
from edge.infer.backend import Backend, Tensor
from edge.infer.fusion import Fusion, combo_name
from edge.infer.gallery import ReferenceGallery
from edge.infer.manifest import Manifest, ManifestError, load_manifest, sha256_file
from edge.infer.ood import OodError, OodRule
from edge.infer.runtimes import open_backend
from edge.infer.size_check import RIGID_PACKAGING, GeometryResult, geometry_check
from edge.types import CLASSIFIER_DAMAGE_TYPES, DamageType, F32Array, ItemCrop, ItemRecord, Scores

log = structlog.get_logger(__name__)

EMBEDDING = "embedding"
DAMAGE = "damage"
TYPE_NAMES = tuple(t.value for t in CLASSIFIER_DAMAGE_TYPES)
#: Reference views are learned in these orientations (the crop's long side stays on x).
_VARIANTS = ((False, False), (True, False), (False, True), (True, True))  # flip x, flip y


@dataclass(frozen=True, slots=True)
class ItemInference:
    """Model outputs for one item; `anomaly` is normalized, `anomaly_raw` the distance."""

    damage: float
    per_type: Mapping[str, float]
    anomaly: float | None
    anomaly_raw: float | None
    anomaly_map: F32Array | None  # (S, S) in crop pixels of `anomaly_camera`
    anomaly_camera: str | None
    geometry: float | None
    fused: float
    boxes: Mapping[str, tuple[int, int, int, int]] = field(default_factory=dict)
    cameras: tuple[str, ...] = ()
    ood: float | None = None  # >= 1: out of distribution (None: models without the outputs)

    @property
    def has_gallery(self) -> bool:
        return self.anomaly is not None

    @property
    def has_depth(self) -> bool:
        return self.geometry is not None

    @property
    def combo(self) -> str:
        return combo_name(self.anomaly is not None, self.geometry is not None)

    def scores(self) -> Scores:
        return Scores(self.damage, self.anomaly, self.geometry, self.fused, dict(self.per_type),
                      self.ood)


def depth_channels(crop: ItemCrop, size: int, abs_scale_mm: float, out: F32Array) -> None:
    """Fill (3, size, size): height / abs scale, height / item top, valid-depth flag."""
    if not crop.has_depth:
        out[:] = 0.0
        return
    h = crop.height_mm
    if h.shape[0] != size:
        h = np.asarray(cv2.resize(h, (size, size), interpolation=cv2.INTER_LINEAR), np.float32)
    inside = h[h > 0]
    top = float(np.percentile(inside, 95)) if inside.size else 1.0
    np.multiply(h, 1.0 / abs_scale_mm, out=out[0])
    np.multiply(h, 1.0 / max(top, 1.0), out=out[1])
    np.clip(out[1], 0.0, 1.5, out=out[1])
    out[2] = 1.0


def rgb_channels(color: np.ndarray, size: int, out: F32Array, *, to_rgb: bool) -> None:
    """Fill (3, size, size) with the BGR crop as float in RGB order (`to_rgb`, what ImageNet
    weights expect) or as it is (models from before the order was fixed); the graph
    normalizes."""
    img = color if color.shape[0] == size else cv2.resize(color, (size, size),
                                                           interpolation=cv2.INTER_AREA)
    out[:] = np.moveaxis(img[..., ::-1] if to_rgb else img, 2, 0)


def channel_order_is_rgb(manifest: Manifest) -> bool:
    order = str(manifest.model(EMBEDDING).preprocessing.get("channel_order", "BGR")).upper()
    if order not in ("RGB", "BGR"):
        raise ManifestError("models.embedding.preprocessing.channel_order", f"got {order!r}",
                            "RGB or BGR")
    return order == "RGB"


def _surface_full_mm(raw: object) -> float | None:
    """`fusion.geometry.surface_full_mm`: None (no top-face check) or a depth in mm > 0."""
    if raw is None:
        return None
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ManifestError("fusion.geometry.surface_full_mm", f"got {raw!r}",
                            "a depth in millimetres > 0")
    return value


def ood_rule(manifest: Manifest) -> OodRule | None:
    """The manifest's out-of-distribution rule; None for models without one. A rule whose
    embedding model lacks the `parcel` and `novelty` outputs is an error, not ignored."""
    try:
        rule = OodRule.from_mapping(manifest.raw.get("ood"))
    except OodError as exc:
        raise ManifestError("ood", str(exc), "parcel_min_logprob and novelty_max") from None
    outputs = {t.name for t in manifest.model(EMBEDDING).outputs}
    if rule is not None and not {"parcel", "novelty"} <= outputs:
        raise ManifestError("models.embedding.outputs", f"got {sorted(outputs)}",
                            "parcel and novelty outputs, which the ood section needs")
    return rule


def map_box(prob_map: F32Array, size: int) -> tuple[int, int, int, int]:
    """Bounding box (x, y, w, h in crop pixels) of the map cells above half its peak."""
    cells = prob_map >= 0.5 * float(prob_map.max())
    ys, xs = np.nonzero(cells)
    step = size / prob_map.shape[0]
    x0, y0 = int(xs.min() * step), int(ys.min() * step)
    return (x0, y0, int((xs.max() + 1) * step) - x0, int((ys.max() + 1) * step) - y0)


def embedding_identity(manifest: Manifest) -> str:
    """What patch features depend on: the embedding model file and its input size. Two
    models that share it compute the same features (a TensorRT engine is built from it)."""
    spec = manifest.model(EMBEDDING)
    order = "@rgb" if channel_order_is_rgb(manifest) else ""  # BGR models keep their identity
    return f"{spec.sha256[:16]}@{int(spec.preprocessing.get('size', 128))}{order}"


class ItemInspector:
    """Runs the models on items' crops; thread-compatible (one caller at a time)."""

    def __init__(self, manifest: Manifest, embedding: Backend, damage: Backend, *,
                 gallery: ReferenceGallery, catalogue: Catalogue, cfg: ModelsConfig) -> None:
        self.gallery = gallery
        self.catalogue = catalogue
        self.cfg = cfg
        self._lock = threading.RLock()  # inference and run-time learning share the buffers
        self._configure(manifest, embedding, damage)

    def _configure(self, manifest: Manifest, embedding: Backend, damage: Backend) -> None:
        self.manifest = manifest
        self.embedding = embedding
        self.damage = damage
        self.fusion = Fusion.from_mapping(manifest.fusion)
        self.to_rgb = channel_order_is_rgb(manifest)
        self.ood_rule = ood_rule(manifest)
        pre = manifest.model(DAMAGE).preprocessing
        self.size = int(manifest.model(EMBEDDING).preprocessing.get("size", 128))
        self.abs_scale_mm = float(pre.get("height_scale_mm", 200.0))
        geo = dict(manifest.fusion.get("geometry") or {})
        self.expected_fill = {str(k): float(v) for k, v in
                              dict(geo.get("expected_fill") or {}).items()}
        self.geometry_slack = float(geo.get("slack", 0.0))
        self.surface_full_mm = _surface_full_mm(geo.get("surface_full_mm"))
        self.surface_packaging = tuple(str(p) for p in geo.get("surface_packaging")
                                       or RIGID_PACKAGING)
        self._allocate(2 * self.cfg.max_batch)

    def _allocate(self, crops: int) -> None:
        """Preallocated model inputs for `crops` crops (grown if an item has more views)."""
        self._rgb = np.zeros((crops, 3, self.size, self.size), np.float32)
        self._depth = np.zeros((crops, 3, self.size, self.size), np.float32)

    @classmethod
    def load(cls, cfg: ModelsConfig, catalogue: Catalogue,
             manifest_path: Path | None = None, *, read_only: bool = False,
             on_progress: Callable[[str], object] | None = None) -> ItemInspector:
        """Verify the manifest, open both models, open (and seed) the gallery; `read_only`
        (the doctor, beside a running node) re-embeds and seeds in memory only.
        `on_progress` hears of each bank re-embedded after a model update (a large gallery
        takes a while: the service extends systemd's start timeout with it)."""
        manifest = load_manifest(manifest_path or cfg.manifest)
        embedding = open_backend(manifest.model(EMBEDDING), cfg)
        damage = open_backend(manifest.model(DAMAGE), cfg)
        gallery = ReferenceGallery(cfg.gallery_dir, model=embedding_identity(manifest),
                                   adopt_unrecorded=True)
        inspector = cls(manifest, embedding, damage, gallery=gallery, catalogue=catalogue,
                        cfg=cfg)
        inspector.refresh_gallery(persist=not read_only, on_progress=on_progress)
        if inspector.gallery.is_empty():
            inspector.seed_gallery(persist=not read_only)
        if not read_only:
            gallery.flush()  # banks from before models were recorded now say whose they are
        return inspector

    def _seed_views(self) -> dict[tuple[str, str], list[np.ndarray]]:
        """The shipped reference views (manifest `gallery_seed`) per product and camera."""
        seed = self.manifest.raw.get("gallery_seed")
        if not isinstance(seed, dict):
            return {}
        path = self.manifest.path.parent / str(seed["file"])
        if sha256_file(path) != str(seed.get("sha256")):
            log.error("gallery_seed_mismatch", path=str(path))
            return {}
        with np.load(path, allow_pickle=False) as data:
            rgb, products, cams = data["rgb"], data["product_id"], data["camera_id"]
        views: dict[tuple[str, str], list[np.ndarray]] = {}
        for img, pid, cam in zip(rgb, products, cams, strict=True):
            views.setdefault((str(pid), str(cam)), []).append(img)
        return views

    def seed_gallery(self, *, persist: bool = True) -> int:
        """Learn the shipped reference views (manifest `gallery_seed`); returns views added."""
        seed = self._seed_views()
        for (pid, cam), views in sorted(seed.items()):
            self._learn(self.gallery, pid, cam, views, persist=persist)
        added = sum(map(len, seed.values()))
        if added:
            log.info("gallery_seeded", views=added, products=len({p for p, _ in seed}))
        return added

    def refresh_gallery(self, gallery: ReferenceGallery | None = None, *,
                        persist: bool = True,
                        on_progress: Callable[[str], object] | None = None) -> dict[str, int]:
        """Re-embed the gallery's stale banks (another embedding model's) with this
        inspector's model, from the views each bank keeps, or else from the shipped views
        of that product. A bank with neither is left out (logged: the product is judged
        without the gallery until feedback or an operator gives it references again)."""
        g = self.gallery if gallery is None else gallery
        counts = {"rebuilt": 0, "reseeded": 0, "lost": 0}
        stale = g.stale()
        seed = self._seed_views() if stale else {}
        for done, ((pid, cam), old_model) in enumerate(sorted(stale.items()), start=1):
            if on_progress is not None:
                on_progress(f"re-embedding the gallery for the new model: bank {done} of "
                            f"{len(stale)}")
            views = g.stored_views(pid, cam)
            how = "rebuilt"
            if not views and (pid, cam) in seed:
                views, how = seed[(pid, cam)], "reseeded"
            if not views:
                g.forget_stale(pid, cam)
                counts["lost"] += 1
                log.error("gallery_bank_lost", product_id=pid, camera=cam, old_model=old_model,
                          model=g.model, hint="its file keeps no reference views to re-embed: "
                          "send packaging_changed feedback for this product, or copy in "
                          "references made with the current model")
                continue
            self._learn(g, pid, cam, views, persist=persist, replace=True)
            counts[how] += 1
        if stale:
            log.info("gallery_reembedded", model=g.model, **counts)
        return counts

    def embed(self, colors: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
        """Patch features (N, C, H, W) and trunk features of BGR crops, in batches."""
        out = self.embed_outputs(colors)
        return out["patches"], out["trunk"]

    def embed_outputs(self, colors: Sequence[np.ndarray]) -> dict[str, Tensor]:
        """Every output of the embedding model for BGR crops, in batches (one crop per call
        on ONNX Runtime: its softmax rounds the last bit differently with more rows in the
        call, and a verdict must replay bit for bit whatever shared its batch)."""
        parts: dict[str, list[Tensor]] = {}
        cap = 1 if self.embedding.name == "onnxruntime" else len(self._rgb)
        for start in range(0, len(colors), cap):
            chunk = colors[start:start + cap]
            for i, color in enumerate(chunk):
                rgb_channels(color, self.size, self._rgb[i], to_rgb=self.to_rgb)
            for name, value in self.embedding.run({"rgb": self._rgb[:len(chunk)]}).items():
                parts.setdefault(name, []).append(value)
        return {name: np.concatenate(values) for name, values in parts.items()}

    def learn_views(self, product_id: str, camera_id: str, colors: Sequence[np.ndarray]) -> None:
        """Add BGR crops of one camera as references (in every orientation of the long side)."""
        self._learn(None, product_id, camera_id, colors)

    def _learn(self, gallery: ReferenceGallery | None, product_id: str, camera_id: str,
               colors: Sequence[np.ndarray], *, persist: bool = True,
               replace: bool = False) -> None:
        """Embed `colors` and add them to `gallery` (None: the one in use, taken under the
        lock so that a reload switching models cannot pair one model's features with the
        other's gallery). Written to disk after the lock: inference does not wait on it."""
        with self._lock:
            target = self.gallery if gallery is None else gallery
            self._add_views(target, product_id, camera_id, colors, replace=replace)
        if persist:
            target.flush()

    def _add_views(self, gallery: ReferenceGallery, product_id: str, camera_id: str,
                   colors: Sequence[np.ndarray], *, replace: bool = False) -> None:
        """Embed and add, unwritten; the caller holds `_lock`."""
        variants = [np.ascontiguousarray(c[::-1 if fy else 1, ::-1 if fx else 1])
                    for c in colors for fx, fy in _VARIANTS]
        patches, _ = self.embed(variants)
        gallery.add(product_id, camera_id, patches, views=len(colors), images=colors,
                    persist=False, replace=replace)

    def learn_reference(self, product_id: str, colors: Mapping[str, np.ndarray]) -> None:
        """Add an item's views (its BGR crop per camera) as pristine references of
        `product_id` (persisted)."""
        for camera_id, color in colors.items():
            self.learn_views(product_id, camera_id, [color])

    def judge_views(self, colors: Sequence[np.ndarray]) -> tuple[Tensor, list[float]]:
        """Patch features (N, C, H, W) of BGR crops and the damage score of each on its own
        (no depth, no gallery), under the lock that inference holds: for views that come
        from elsewhere (the site's shared gallery). A view out of distribution, or with
        unreadable signals, scores NaN: no damage check can pass it."""
        patches, scores = [], []
        step = self.cfg.max_batch
        with self._lock:
            for start in range(0, len(colors), step):
                chunk = colors[start:start + step]
                if len(chunk) > len(self._depth):
                    self._allocate(len(chunk))
                emb = self.embed_outputs(chunk)
                self._depth[:len(chunk)] = 0.0  # as for a crop without depth
                dmg = self.damage.run({"trunk": emb["trunk"],
                                       "depth": self._depth[:len(chunk)]})
                patches.append(emb["patches"])
                for i, row in enumerate(dmg["probs"]):
                    ood = None if self.ood_rule is None else self.ood_rule.view_score(
                        float(emb["parcel"][i][0]), float(emb["novelty"][i][0]))
                    known = ood is None or (not math.isnan(ood) and ood < 1.0)
                    scores.append(float(row[0]) if known else math.nan)
        return np.concatenate(patches), scores

    def infer(self, records: Sequence[ItemRecord]) -> list[ItemInference]:
        """Scores for each record, batching up to `max_batch` items per model call."""
        out: list[ItemInference] = []
        step = self.cfg.max_batch
        with self._lock:
            for start in range(0, len(records), step):
                out.extend(self._infer_chunk(records[start:start + step]))
        return out

    def _infer_chunk(self, records: Sequence[ItemRecord]) -> list[ItemInference]:
        views = [(r, cam, crop) for r in records for cam, crop in sorted(r.crops.items())]
        if not views:
            return [self._combine(r, []) for r in records]
        if len(views) > len(self._depth):
            self._allocate(len(views))
        emb = self.embed_outputs([crop.color for _, _, crop in views])
        patches, trunk = emb["patches"], emb["trunk"]
        for i, (_, _, crop) in enumerate(views):
            depth_channels(crop, self.size, self.abs_scale_mm, self._depth[i])
        dmg = self.damage.run({"trunk": trunk, "depth": self._depth[:len(views)]})
        per_view = [(cam, crop, dmg["probs"][i], dmg["maps"][i], patches[i])
                    for i, (_, cam, crop) in enumerate(views)]
        signals = [(float(p[0]), float(n[0])) for p, n in
                   zip(emb["parcel"], emb["novelty"], strict=True)] \
            if self.ood_rule is not None else []
        results, k = [], 0
        for r in records:
            n = len(r.crops)
            ood = None if self.ood_rule is None else self.ood_rule.item_score(signals[k:k + n])
            results.append(dataclasses.replace(self._combine(r, per_view[k:k + n]), ood=ood))
            k += n
        return results

    def _combine(self, record: ItemRecord,
                 views: Sequence[tuple[str, ItemCrop, Tensor, Tensor, Tensor]]
                 ) -> ItemInference:
        damage = _max_or_nan([float(p[0]) for _, _, p, _, _ in views])
        per_type: dict[str, float] = {}
        boxes: dict[str, tuple[int, int, int, int]] = {}
        for t, name in enumerate(TYPE_NAMES, start=1):
            if views:
                probs = [float(v[2][t]) for v in views]
                top = views[probs.index(max(probs))]
                per_type[name] = _max_or_nan(probs)
                if math.isfinite(per_type[name]):
                    boxes[name] = map_box(top[3][t], top[1].color.shape[0])
        raw, amap, acam = self._anomaly(record.product_id, views)
        measured = self.measure_geometry(record)
        geometry = None if measured is None else measured.score
        anomaly = self.fusion.normalize_anomaly(raw)
        broken = self._broken_set(record.product_id, anomaly,
                                  None if measured is None else measured.set_score,
                                  max(per_type.values(), default=0.0))
        if broken is not None:
            per_type[DamageType.BROKEN_SET.value] = broken
            if amap is not None:
                boxes[DamageType.BROKEN_SET.value] = map_box(amap, amap.shape[0])
        return ItemInference(damage, per_type, anomaly, raw, amap, acam, geometry,
                             self.fusion.fuse(damage, anomaly, geometry), boxes,
                             tuple(cam for cam, *_ in views))

    def _anomaly(self, product_id: str | None,
                 views: Sequence[tuple[str, ItemCrop, Tensor, Tensor, Tensor]]
                 ) -> tuple[float | None, F32Array | None, str | None]:
        best: tuple[float, F32Array, str] | None = None
        for cam, crop, _, _, patches in views:
            res = None if product_id is None else self.gallery.score(product_id, cam, patches)
            if res is not None and math.isnan(res.score):
                return math.nan, None, cam  # judged as unreadable, whichever camera it was
            if res is not None and (best is None or res.score > best[0]):
                size = crop.color.shape[0]
                amap = np.asarray(cv2.resize(res.patch_map, (size, size),
                                             interpolation=cv2.INTER_LINEAR), np.float32)
                best = (res.score, amap, cam)
        return (None, None, None) if best is None else best

    def _broken_set(self, product_id: str | None, anomaly: float | None,
                    geometry: float | None, typed_damage: float) -> float | None:
        """Multipacks only: gallery + geometry evidence that no classifier type explains."""
        product = None if product_id is None else self.catalogue.get(product_id)
        if product is None or product.units <= 1 or (anomaly is None and geometry is None):
            return None
        return self.fusion.fuse(0.5, anomaly, geometry) * (1.0 - typed_damage)

    def measure_geometry(self, record: ItemRecord) -> GeometryResult | None:
        """The geometry check of `record` as inference runs it; None without product or depth."""
        product = None if record.product_id is None else self.catalogue.get(record.product_id)
        if product is None:
            return None
        return geometry_check(record.box_mm, product, record.crops, self.expected_fill,
                              self.geometry_slack, self.surface_full_mm, self.surface_packaging)

    def swap_models(self, manifest: Manifest, embedding: Backend, damage: Backend, *,
                    gallery: ReferenceGallery | None = None, journal_mark: int = 0) -> None:
        """Run on other, already opened models from now on, and close the old ones. With
        `gallery` (re-embedded for a new embedding model), feedback the running gallery
        learned since `journal_mark` is embedded into it before it takes over."""
        old = (self.embedding, self.damage)
        with self._lock:
            self._configure(manifest, embedding, damage)
            if gallery is not None:
                # A view or two, learned while the new gallery was prepared.
                caught_up = self.gallery.learned_since(journal_mark)
                for (pid, cam), views in caught_up:
                    self._add_views(gallery, pid, cam, views)
                self.gallery = gallery
                log.info("gallery_switched", model=gallery.model, caught_up=len(caught_up))
        for backend in old:
            backend.close()
        log.info("models_reloaded", versions=manifest.model_versions(),
                 thresholds=manifest.threshold_version)

    def persist_gallery(self) -> int:
        """Write what the gallery holds unwritten (after a reload's switch, which must not
        wait on the disk); returns how many banks could not be written."""
        return self.gallery.flush()

    def model_versions(self) -> dict[str, str]:
        return self.manifest.model_versions()

    def close(self) -> None:
        self.embedding.close()
        self.damage.close()


def _max_or_nan(values: Sequence[float]) -> float:
    """The largest score, NaN if any view's is NaN: Python's `max` keeps or drops a NaN
    depending on where it stands, so the cameras' order decided. A NaN damage score then
    sidelines the item (the fused score is NaN, never under its threshold)."""
    if any(math.isnan(v) for v in values):
        return math.nan
    return max(values, default=0.0)
