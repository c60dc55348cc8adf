"""The shared gallery's message: one retained JSON message per product and embedding model on
`{prefix}/site/{site_id}/gallery/{product_id}/{embedding_model_id}`, holding the site's shared
reference views of that product, newest first (docs/mqtt.md#shared-gallery; the contract is
edge/publish/schemas/gallery.schema.json).

Parsing checks the form (what the schema says, and the sizes that keep decoding safe: a PNG's
dimensions are read from its header before it is decoded, features are decompressed to their
stated size and no further). Whether a view is good is the receiver's to judge
(`edge.site.gallery_share`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from edge.types import F32Array, U8Array

SCHEMA_VERSION = 1
#: Bytes a message takes besides its views (IDs are at most `MAX_ID` characters): the view
#: budget is the size limit less this, the same on every node, so that all cap alike.
HEADER_ALLOWANCE = 4096
MAX_ID = 128
#: Views in one message: cameras times the bank cap, with room to spare.
MAX_VIEWS = 512
#: Patch features per view, at most (the shipped model: 120 x 16 x 16).
MAX_FEATURE_VALUES = 1 << 21
_ID = re.compile(rf"[^/#+\s\x00]{{1,{MAX_ID}}}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_TOP_KEYS = frozenset(("schema_version", "site_id", "product_id", "embedding_model_id",
                       "node_id", "version", "timestamp", "views"))
_VIEW_KEYS = frozenset(("camera_id", "node_id", "learned_ms", "sha256", "png", "features"))
_FEATURE_KEYS = frozenset(("dtype", "compression", "shape", "data"))
_MAX_INT = 2**53 - 1  # what every JSON reader keeps exactly


class MessageRefusedError(ValueError):
    """A message refused; `reason` is its outcome label (`malformed`, `schema`, ...)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def is_topic_id(value: str) -> bool:
    """Whether `value` can be a level of a gallery topic (and an ID in its message)."""
    return bool(_ID.fullmatch(value))


def gallery_root(prefix: str, site_id: str) -> str:
    return f"{prefix.rstrip('/')}/site/{site_id}/gallery"


def gallery_topic(prefix: str, site_id: str, product_id: str, model_id: str) -> str:
    return f"{gallery_root(prefix, site_id)}/{product_id}/{model_id}"


def topic_parts(topic: str, prefix: str, site_id: str) -> tuple[str, str] | None:
    """(product ID, embedding model ID) of a gallery topic; None for any other topic."""
    root = gallery_root(prefix, site_id) + "/"
    if not topic.startswith(root):
        return None
    parts = topic[len(root):].split("/")
    return (parts[0], parts[1]) if len(parts) == 2 and all(map(is_topic_id, parts)) else None


@dataclass(frozen=True, slots=True)
class SharedView:
    """One reference view as shared: kept byte for byte as its learning node encoded it, so
    that every node holds, caps and republishes the same bytes."""

    camera_id: str
    node_id: str  # the node that learned it
    learned_ms: int
    sha256: str  # of the PNG: the view's identity
    png_b64: str  # BGR crop at the embedding model's input size
    shape: tuple[int, int, int]  # of the patch features (C, H, W)
    features_b64: str  # float16 little-endian, zlib, base64

    def to_json(self) -> dict[str, Any]:
        return {"camera_id": self.camera_id, "node_id": self.node_id,
                "learned_ms": self.learned_ms, "sha256": self.sha256, "png": self.png_b64,
                "features": {"dtype": "float16", "compression": "zlib",
                             "shape": list(self.shape), "data": self.features_b64}}

    def size(self) -> int:
        """Bytes it takes in a message (with its separating comma)."""
        return len(_dumps(self.to_json())) + 1

    def sort_key(self) -> tuple[int, str]:
        """Newest first, then by content: the same order on every node."""
        return (-self.learned_ms, self.sha256)


@dataclass(frozen=True, slots=True)
class GalleryMessage:
    site_id: str
    product_id: str
    model_id: str
    node_id: str  # the node that published this message
    version: int
    timestamp: int
    views: tuple[SharedView, ...]


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def render_message(msg: GalleryMessage) -> bytes:
    return _dumps({"schema_version": SCHEMA_VERSION, "site_id": msg.site_id,
                   "product_id": msg.product_id, "embedding_model_id": msg.model_id,
                   "node_id": msg.node_id, "version": msg.version,
                   "timestamp": msg.timestamp, "views": [v.to_json() for v in msg.views]})


def merge_views(views: Iterable[SharedView], *, per_camera: int,
                budget_bytes: int) -> list[SharedView]:
    """The union by content, newest first, cut to `per_camera` views per camera and to the
    longest run that fits `budget_bytes`. Only the views decide the result, so every node
    that holds the same views keeps the same ones, and merging again changes nothing."""
    unique = {v.sha256: v for v in views}
    kept: list[SharedView] = []
    counts: dict[str, int] = {}
    used = 0
    for view in sorted(unique.values(), key=SharedView.sort_key):
        if counts.get(view.camera_id, 0) >= per_camera:
            continue
        used += view.size()
        if used > budget_bytes:
            break
        counts[view.camera_id] = counts.get(view.camera_id, 0) + 1
        kept.append(view)
    return kept


def encode_view(camera_id: str, node_id: str, learned_ms: int, crop: U8Array,
                patches: F32Array) -> SharedView:
    """A view of this node's: `crop` (BGR, at the model's input size) and its (C, H, W) patch
    features."""
    ok, png = cv2.imencode(".png", np.ascontiguousarray(crop))
    if not ok:  # pragma: no cover - OpenCV encodes every uint8 BGR image
        raise ValueError("PNG encoding failed")
    raw = bytes(png)
    c, h, w = patches.shape
    features = zlib.compress(np.ascontiguousarray(patches, dtype="<f2").tobytes(), 6)
    return SharedView(camera_id, node_id, int(learned_ms), hashlib.sha256(raw).hexdigest(),
                      base64.b64encode(raw).decode("ascii"), (int(c), int(h), int(w)),
                      base64.b64encode(features).decode("ascii"))


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MessageRefusedError("malformed", f"{what}: not base64") from None


def decode_crop(view: SharedView, size: int) -> U8Array:
    """The view's BGR crop; its PNG must be `size` x `size` (read from the header before
    anything is decoded) and hash to the view's `sha256`."""
    raw = _b64(view.png_b64, "png")
    if hashlib.sha256(raw).hexdigest() != view.sha256:
        raise MessageRefusedError("malformed", f"view {view.sha256[:12]}: sha256 is not the PNG's")
    if len(raw) < 24 or raw[:8] != _PNG_MAGIC or raw[12:16] != b"IHDR":
        raise MessageRefusedError("malformed", f"view {view.sha256[:12]}: not a PNG")
    width, height = int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")
    if (width, height) != (size, size):
        raise MessageRefusedError("malformed", f"view {view.sha256[:12]}: {width}x{height}, "
                              f"the embedding model takes {size}x{size}")
    img = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
    if img is None or img.shape != (size, size, 3):
        raise MessageRefusedError("malformed", f"view {view.sha256[:12]}: undecodable PNG")
    out: U8Array = np.ascontiguousarray(img, dtype=np.uint8)
    return out


def decode_features(view: SharedView) -> F32Array:
    """The view's patch features as float32 (C, H, W)."""
    expected = 2 * int(np.prod(view.shape))
    inflater = zlib.decompressobj()
    try:  # never more than the stated size: a small message cannot inflate to gigabytes
        raw = inflater.decompress(_b64(view.features_b64, "features"), expected + 1)
    except zlib.error:
        raise MessageRefusedError("malformed", f"view {view.sha256[:12]}: bad zlib data") from None
    if len(raw) != expected or not inflater.eof:
        raise MessageRefusedError("malformed", f"view {view.sha256[:12]}: features are not "
                              f"{list(view.shape)} float16")
    out: F32Array = np.frombuffer(raw, "<f2").astype(np.float32).reshape(view.shape)
    return out


def features_match(theirs: F32Array, mine: F32Array, tolerance: float) -> bool:
    """Whether features another node sent are what this node's model computes for the same
    crop: relative L2 distance within `tolerance` (float16 and another backend's rounding
    stay far below it; another model, or another crop, far above)."""
    if theirs.shape != mine.shape or not np.isfinite(theirs).all():
        return False
    norm = float(np.linalg.norm(mine))
    return float(np.linalg.norm(theirs - mine)) <= tolerance * max(norm, 1e-6)


def _field(data: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    value = data[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise MessageRefusedError("schema", f"{where}{key}: expected {kind.__name__}")
    return value


def _id(data: Mapping[str, Any], key: str, where: str = "") -> str:
    value = _field(data, key, str, where)
    if not is_topic_id(value):
        raise MessageRefusedError("schema", f"{where}{key}: 1-{MAX_ID} characters, no '/', '#', "
                              "'+' or white space")
    return str(value)


def _count(data: Mapping[str, Any], key: str, lo: int, where: str = "") -> int:
    value = _field(data, key, int, where)
    if not lo <= value <= _MAX_INT:
        raise MessageRefusedError("schema", f"{where}{key}: an integer from {lo}")
    return int(value)


def _keys(data: object, keys: frozenset[str], where: str) -> Mapping[str, Any]:
    if not isinstance(data, dict):
        raise MessageRefusedError("schema", f"{where or 'message'}: expected an object")
    if set(data) != keys:
        missing, unknown = sorted(keys - set(data)), sorted(set(data) - keys)
        raise MessageRefusedError("schema", f"{where or 'message'}: missing {missing}, "
                              f"unknown {unknown}")
    return data


def parse_view(data: object, where: str = "view.") -> SharedView:
    view = _keys(data, _VIEW_KEYS, where)
    features = _keys(view["features"], _FEATURE_KEYS, f"{where}features")
    if features["dtype"] != "float16" or features["compression"] != "zlib":
        raise MessageRefusedError("schema", f"{where}features: float16, zlib")
    shape = features["shape"]
    if (not isinstance(shape, list) or len(shape) != 3
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1
                       for n in shape) or int(np.prod(shape)) > MAX_FEATURE_VALUES):
        raise MessageRefusedError("schema", f"{where}features.shape: three positive integers, "
                              f"at most {MAX_FEATURE_VALUES} values")
    sha = _field(view, "sha256", str, where)
    if not _SHA256.fullmatch(sha):
        raise MessageRefusedError("schema", f"{where}sha256: 64 lower-case hex digits")
    return SharedView(_id(view, "camera_id", where), _id(view, "node_id", where),
                      _count(view, "learned_ms", 0, where), sha,
                      _field(view, "png", str, where), (shape[0], shape[1], shape[2]),
                      _field(features, "data", str, f"{where}features."))


def parse_message(payload: bytes) -> GalleryMessage:
    """The message, or `MessageRefusedError` (`malformed`: not a JSON object; `schema`: not
    what gallery.schema.json allows)."""
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise MessageRefusedError("malformed", "not UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise MessageRefusedError("malformed", "not a JSON object")
    msg = _keys(data, _TOP_KEYS, "")
    if msg["schema_version"] != SCHEMA_VERSION or isinstance(msg["schema_version"], bool):
        raise MessageRefusedError("schema", f"schema_version: {SCHEMA_VERSION}")
    views = msg["views"]
    if not isinstance(views, list) or not 1 <= len(views) <= MAX_VIEWS:
        raise MessageRefusedError("schema", f"views: 1 to {MAX_VIEWS} views")
    parsed = tuple(parse_view(v, f"views[{i}].") for i, v in enumerate(views))
    if len({v.sha256 for v in parsed}) != len(parsed):
        raise MessageRefusedError("schema", "views: a view (sha256) twice")
    return GalleryMessage(_id(msg, "site_id"), _id(msg, "product_id"),
                          _id(msg, "embedding_model_id"), _id(msg, "node_id"),
                          _count(msg, "version", 1), _count(msg, "timestamp", 0), parsed)
