"""The models as the offline tools run them (`inspect`, `replay`, `train`): an inspector whose
reference gallery is read, never written."""

from __future__ import annotations

from pathlib import Path

from edge.catalogue import load_catalogue
from edge.config import ModelsConfig
from edge.infer.gallery import ReferenceGallery
from edge.infer.inspector import DAMAGE, EMBEDDING, ItemInspector, embedding_identity
from edge.infer.manifest import load_manifest
from edge.infer.runtimes import open_backend


def memory_inspector(models: ModelsConfig, gallery_dir: Path | None = None) -> ItemInspector:
    """An inspector whose gallery lives in memory: the banks of `gallery_dir` (a node's
    `models.gallery_dir`) when given, else, or when that holds none, the shipped references."""
    manifest = load_manifest(models.manifest)
    gallery = ReferenceGallery(gallery_dir, model=embedding_identity(manifest),
                               adopt_unrecorded=True)
    inspector = ItemInspector(manifest, open_backend(manifest.model(EMBEDDING), models),
                              open_backend(manifest.model(DAMAGE), models),
                              gallery=gallery, catalogue=load_catalogue(), cfg=models)
    # Read, never written: another model's references are re-embedded here, in memory.
    inspector.refresh_gallery(persist=False)
    if inspector.gallery.is_empty():
        inspector.seed_gallery(persist=False)
    return inspector
