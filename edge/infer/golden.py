"""Golden self-test: a small shipped set of known items, run end to end through the backend.

The scores must match the expectations stored with the set (written when
the models were trained) within the manifest's tolerance. The node runs it
at start and on every reload (SIGHUP, update); a mismatch refuses the new
models and is reported in the log and on `…/events`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from edge.durable import atomic_file
from edge.infer.dataset import HEIGHT_UNIT_MM
from edge.infer.gallery import ReferenceGallery
from edge.infer.inspector import ItemInference, ItemInspector
from edge.infer.manifest import ManifestError, sha256_file
from edge.types import ItemCrop, ItemRecord, box3

log = structlog.get_logger(__name__)

DEFAULT_TOLERANCE = 0.02
#: Compared per item: classifier probability, anomaly distance, fused probability.
COMPARED = ("damage", "anomaly_raw", "fused")


@dataclass(frozen=True, slots=True)
class GoldenReport:
    passed: bool
    items: int
    max_abs_diff: float
    tolerance: float
    backend: str
    seconds: float
    failures: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "items": self.items, "max_abs_diff": self.max_abs_diff,
                "tolerance": self.tolerance, "backend": self.backend,
                "seconds": round(self.seconds, 3), "failures": list(self.failures)}


@dataclass(frozen=True, slots=True)
class GoldenSet:
    records: tuple[ItemRecord, ...]
    references: tuple[tuple[str, str, np.ndarray], ...]  # product, camera, BGR crop
    expected: dict[str, np.ndarray]  # COMPARED -> (n,), NaN where absent
    labels: tuple[str, ...]


def golden_path(inspector: ItemInspector) -> Path:
    golden = inspector.manifest.golden
    if "file" not in golden:
        raise ManifestError(str(inspector.manifest.path), "no golden set", "golden: {file, sha256}")
    return inspector.manifest.path.parent / str(golden["file"])


def load_golden(path: Path, sha256: str | None = None) -> GoldenSet:
    if sha256 is not None and (not path.is_file() or sha256_file(path) != sha256):
        raise ManifestError(str(path), "golden set missing or its sha256 differs",
                            f"sha256 {sha256}")
    with np.load(path, allow_pickle=False) as d:
        cams = [str(c) for c in d["cameras"]]
        records = []
        for i in range(len(d["product_ids"])):
            crops = {cam: ItemCrop(cam, d["colors"][i, v],
                                   d["heights"][i, v].astype(np.float32) * HEIGHT_UNIT_MM,
                                   d["masks"][i, v], has_depth=bool(d["heights"][i, v].any()))
                     for v, cam in enumerate(cams)}
            box = box3(d["box_mm"][i])
            records.append(ItemRecord(i, f"golden-{i}", str(d["product_ids"][i]), 0.0, 0.0, 1e12,
                                      box, (0.0, 0.0), crops))
        refs = tuple((str(p), str(c), d["ref_colors"][k]) for k, (p, c) in
                     enumerate(zip(d["ref_products"], d["ref_cameras"], strict=True)))
        expected = {k: d[f"expected_{k}"].astype(np.float64) for k in COMPARED}
        labels = tuple(str(x) for x in d["labels"])
    return GoldenSet(tuple(records), refs, expected, labels)


def golden_scores(inspector: ItemInspector, golden: GoldenSet) -> list[ItemInference]:
    """Scores of the golden items against a gallery of only the golden references."""
    probe = ItemInspector(inspector.manifest, inspector.embedding, inspector.damage,
                          gallery=ReferenceGallery(None), catalogue=inspector.catalogue,
                          cfg=inspector.cfg)
    for product, camera in sorted({(p, c) for p, c, _ in golden.references}):
        views = [img for p, c, img in golden.references if (p, c) == (product, camera)]
        probe.learn_views(product, camera, views)
    return probe.infer(golden.records)


def stage_expectations(path: Path, expected: Mapping[str, np.ndarray]) -> Path:
    """Write the golden set at `path` with `expected` (COMPARED keys) replacing its stored
    expectations to a staged file beside it (`<name>.tmp`, durable: written through
    edge.durable), and return that file for the caller to rename into place (and fsync
    the folder) before a manifest names its sha256. Items, references and the other
    expectations are copied unchanged."""
    unknown = set(expected) - set(COMPARED)
    if unknown:
        raise ValueError(f"unknown golden expectations {sorted(unknown)}; expected {COMPARED}")
    with np.load(path, allow_pickle=False) as d:
        arrays = {k: d[k] for k in d.files}
    for key, values in expected.items():
        old = arrays[f"expected_{key}"]
        if np.shape(values) != old.shape:
            raise ValueError(f"expected_{key}: {np.shape(values)} values for {old.shape} items")
        arrays[f"expected_{key}"] = np.asarray(values, dtype=old.dtype)
    staged = path.with_name(path.name + ".tmp")
    with atomic_file(staged) as fh:  # a file object: np.savez would append ".npz" to a name
        np.savez_compressed(fh, **arrays)
    return staged


def golden_self_test(inspector: ItemInspector) -> GoldenReport:
    """Run the shipped golden set through `inspector`'s backends; never raises."""
    start = time.monotonic()
    backend = inspector.embedding.name
    tolerance = float(inspector.manifest.golden.get("tolerance", DEFAULT_TOLERANCE))
    try:
        golden = load_golden(golden_path(inspector), str(inspector.manifest.golden.get("sha256")))
        results = golden_scores(inspector, golden)
    except Exception as exc:  # the self-test reports every failure instead of raising
        log.error("golden_self_test_error", error=str(exc))
        return GoldenReport(False, 0, float("inf"), tolerance, backend,
                            time.monotonic() - start, (f"error: {exc}",))
    failures, worst = [], 0.0
    for i, res in enumerate(results):
        for key in COMPARED:
            want = float(golden.expected[key][i])
            got = getattr(res, key)
            got_f = float("nan") if got is None else float(got)
            if np.isnan(want) != np.isnan(got_f):
                failures.append(f"item {i} ({golden.labels[i]}): {key} present={got is not None}")
                continue
            diff = 0.0 if np.isnan(want) else abs(got_f - want)
            worst = max(worst, diff)
            if diff > tolerance:
                failures.append(f"item {i} ({golden.labels[i]}): {key} {got_f:.4f}, "
                                f"expected {want:.4f} ± {tolerance}")
    report = GoldenReport(not failures, len(results), worst, tolerance, backend,
                          time.monotonic() - start, tuple(failures))
    log.info("golden_self_test", passed=report.passed, items=report.items,
             max_abs_diff=round(worst, 5), failures=len(failures))
    return report
