"""Per-item inference cost of the default models on ONNX Runtime, and gallery search cost.

    python tools/bench_infer.py [--threads 1] [--repeat 20] [--out engines/BENCHMARKS.md]

Items are the shipped golden items (two crops each: top and angled). The
per-item figure covers what the node pays per item: embedding (backbone)
and damage head on both crops, gallery search for both crops, geometry
check and fusion.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

# One BLAS thread, as the node runs it (set before numpy loads OpenBLAS): with the default
# (one per core) the gallery search's GEMM is 2-4x slower on a busy 2-core machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edge.commands.models import memory_inspector  # noqa: E402
from edge.config import DEFAULT_MANIFEST, ModelsConfig  # noqa: E402
from edge.infer.gallery import ReferenceGallery  # noqa: E402
from edge.infer.golden import load_golden  # noqa: E402
from edge.infer.inspector import ItemInspector  # noqa: E402


def _time(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    fn()  # warm-up
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(samples), float(np.percentile(samples, 95))


def bench_items(insp: ItemInspector, repeat: int) -> list[str]:
    golden = load_golden(DEFAULT_MANIFEST.parent / "golden" / "golden.npz")
    records = list(golden.records)
    per_item = 0.0
    rows = ["| Batch (items) | ms per call (median / p95) | ms per item | items/s on one core |",
            "|---|---|---|---|"]
    for batch in (1, 8):
        items = (records * 8)[:batch]
        med, p95 = _time(partial(insp.infer, items), repeat)
        rows.append(f"| {batch} | {med:.1f} / {p95:.1f} | {med / batch:.1f} | "
                    f"{1000.0 * batch / med:.1f} |")
        if batch == 1:
            per_item = med
    rows.append("")
    rows.append(f"At the demo's 3 items/s the models take {3 * per_item / 10:.0f}% of one core "
                f"({3 * per_item / 20:.0f}% of the 2-core budget) at batch 1.")
    colors = [c.color for r in records[:4] for c in r.crops.values()]
    emb, _ = _time(lambda: insp.embed(colors), repeat)
    patches, _ = insp.embed(colors[:1])
    cam = next(iter(records[0].crops))
    pid = str(records[0].product_id)
    search, _ = _time(lambda: insp.gallery.score(pid, cam, patches[0]), repeat * 5)
    rows.append("")
    rows.append(f"Breakdown: embedding {emb / len(colors):.1f} ms per crop (batch "
                f"{len(colors)}); gallery search {search:.2f} ms per crop against the shipped "
                f"references of one product ({insp.gallery.views(pid, cam)} views x 4 "
                f"orientations).")
    return rows


def bench_gallery(insp: ItemInspector, repeat: int) -> list[str]:
    golden = load_golden(DEFAULT_MANIFEST.parent / "golden" / "golden.npz")
    colors = [c.color for r in golden.records for c in r.crops.values()]
    patches, _ = insp.embed(colors)
    rng = np.random.default_rng(0)
    rows = ["| References (views) | Patches in bank | ms per crop (median / p95) |",
            "|---|---|---|"]
    for n in (10, 100, 1000):
        gallery = ReferenceGallery(None)
        for start in range(0, n, 50):
            k = min(50, n - start)
            pick = patches[rng.integers(0, len(patches), k)]
            noisy = pick + rng.normal(0, 0.02, pick.shape).astype(np.float32)
            gallery.add("P", "top", noisy, views=k, persist=False)
        bank = gallery.views("P", "top")
        size = min(bank * patches.shape[2] * patches.shape[3], gallery.max_patches)
        med, p95 = _time(partial(gallery.score, "P", "top", patches[0]), repeat * 5)
        rows.append(f"| {n} | {size} | {med:.2f} / {p95:.2f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None, help="write the markdown here too")
    args = ap.parse_args(argv)
    cfg = ModelsConfig(intra_op_threads=args.threads, max_batch=8)
    insp = memory_inspector(cfg, None)
    lines = [
        "# Inference benchmarks (tools/bench_infer.py)", "",
        f"ONNX Runtime CPU, {args.threads} intra-op thread(s), {platform.machine()}, "
        f"{os.cpu_count()} CPUs visible (shared with other work while measured), models "
        f"{insp.manifest.version}. Per item = 2 crops (top, angled): embedding + damage head + "
        "gallery search + geometry + fusion.", "",
        "## Per-item inference", "", *bench_items(insp, args.repeat), "",
        "## Gallery search against gallery size (one product, one camera)", "",
        *bench_gallery(insp, args.repeat), "",
        f"The bank per product and camera is capped at {ReferenceGallery(None).max_patches} "
        "patches (random subsample), so search cost stops growing with the number of views.",
        "",
        f"Measured with OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}: the node "
        "should run with OPENBLAS_NUM_THREADS=1 (the gallery search is one numpy GEMM per "
        "crop; OpenBLAS's default of one thread per core made it 2-4x slower on the shared "
        "2-core machine).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
