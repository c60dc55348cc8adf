"""Model reload: candidate models opened and golden-tested beside the running ones, then
switched to between two batches, or refused with the running models kept."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge.infer.backend import Backend
from edge.infer.fusion import Fusion, FusionError, Thresholds
from edge.infer.gallery import ReferenceGallery
from edge.infer.golden import GoldenReport, golden_self_test
from edge.infer.inspector import (
    DAMAGE,
    EMBEDDING,
    ItemInspector,
    channel_order_is_rgb,
    embedding_identity,
    ood_rule,
)
from edge.infer.manifest import Manifest, ManifestError, load_manifest
from edge.infer.runtimes import open_backend


class ModelRejectedError(RuntimeError):
    """New models failed the golden self-test; the old ones stay in use."""

    def __init__(self, report: GoldenReport) -> None:
        self.report = report
        super().__init__("golden self-test failed: " + "; ".join(report.failures[:5]))


@dataclass(frozen=True, slots=True)
class PreparedModels:
    """Models opened and golden-tested for a reload, not yet in use; with a new embedding
    model, also the gallery re-embedded for it (in memory, written on the switch)."""

    manifest: Manifest
    embedding: Backend
    damage: Backend
    report: GoldenReport
    gallery: ReferenceGallery | None = None
    #: the running gallery's learning journal when the new one was read (see `switch_to`)
    journal_mark: int = 0


def prepare_reload(running: ItemInspector, manifest_path: Path | None = None) -> PreparedModels:
    """Open the manifest's models beside the running ones and run the golden self-test
    on them; nothing changes for the running models.

    Raises `ModelRejectedError` when they miss their golden scores, and `ManifestError`
    for a manifest that cannot be used (its thresholds and fusion sections included:
    the node builds its verdict policy from them).
    """
    path = manifest_path or running.cfg.manifest
    manifest = load_manifest(path)
    try:  # before any model is opened
        Thresholds.from_mapping(manifest.thresholds)
        Fusion.from_mapping(manifest.fusion)
    except FusionError as exc:
        raise ManifestError(str(path), str(exc), "valid thresholds and fusion sections") from None
    channel_order_is_rgb(manifest)  # these raise ManifestError, too
    ood_rule(manifest)
    identity = embedding_identity(manifest)
    current = running.gallery
    new_embedding = identity != current.model and current.model is not None
    mark = current.journal_mark()  # learned after this: caught up at the switch
    gallery = current.for_model(identity) if new_embedding else current
    candidate = ItemInspector(manifest, open_backend(manifest.model(EMBEDDING), running.cfg),
                              open_backend(manifest.model(DAMAGE), running.cfg),
                              gallery=gallery, catalogue=running.catalogue, cfg=running.cfg)
    report = golden_self_test(candidate)
    if not report.passed:
        candidate.close()
        raise ModelRejectedError(report)
    # Stale banks (all of them for a new embedding model; else copied in from a node
    # with another model) are re-embedded here, with the candidate's own backends: the
    # running inspector goes on inferring meanwhile. Written after the switch.
    candidate.refresh_gallery(persist=False)
    if new_embedding and gallery.is_empty():
        candidate.seed_gallery(persist=False)
    return PreparedModels(manifest, candidate.embedding, candidate.damage, report,
                          gallery if new_embedding else None, mark)


def switch_to(running: ItemInspector, prepared: PreparedModels) -> GoldenReport:
    """Run on prepared models from now on (quick: they are open and tested)."""
    running.swap_models(prepared.manifest, prepared.embedding, prepared.damage,
                        gallery=prepared.gallery, journal_mark=prepared.journal_mark)
    return prepared.report


def reload_models(running: ItemInspector, manifest_path: Path | None = None) -> GoldenReport:
    """Prepare, switch and write the gallery: a reload with nothing else to coordinate."""
    report = switch_to(running, prepare_reload(running, manifest_path))
    running.persist_gallery()
    return report
