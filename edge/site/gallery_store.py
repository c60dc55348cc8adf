"""What a node holds of its site's shared gallery: per embedding model and product, the shared
views it keeps (byte for byte as shared) and the highest message version it has seen.

On disk, not in memory: a product's views take up to `site.max_message_kb` (a megabyte by
default), and a site may share a thousand products. One JSON file per product, written
atomically; a file that cannot be read counts as empty (the retained messages fill it again).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import structlog

from edge.durable import write_atomic
from edge.infer.bank_file import safe_name
from edge.site.gallery_message import MessageRefusedError, SharedView, parse_view

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Held:
    """A product's shared views as this node holds them."""

    version: int  # the highest version seen or published for its topic; 0: none
    views: tuple[SharedView, ...]  # newest first

    def shas(self) -> set[str]:
        return {v.sha256 for v in self.views}


class SharedStore:
    """The held views under `root`, a folder per embedding model. One writer (the sharing
    component's worker thread)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, model_id: str, product_id: str) -> Path:
        # safe_name may map two IDs to one name: the hash keeps them apart.
        tag = hashlib.sha256(product_id.encode("utf-8")).hexdigest()[:8]
        return self.root / safe_name(model_id) / f"{safe_name(product_id)}-{tag}.json"

    def load(self, model_id: str, product_id: str) -> Held:
        path = self._path(model_id, product_id)
        try:
            data = json.loads(path.read_bytes())
            views = tuple(parse_view(v) for v in data["views"])
            version = int(data["version"])
        except FileNotFoundError:
            return Held(0, ())
        except (OSError, ValueError, KeyError, TypeError, MessageRefusedError) as exc:
            log.warning("site_gallery_file_unreadable", path=str(path), error=str(exc)[:200])
            return Held(0, ())
        return Held(version, views)

    def save(self, model_id: str, product_id: str, held: Held) -> None:
        path = self._path(model_id, product_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {"product_id": product_id, "embedding_model_id": model_id,
                "version": held.version, "views": [v.to_json() for v in held.views]}
        write_atomic(path, json.dumps(body, separators=(",", ":")))
