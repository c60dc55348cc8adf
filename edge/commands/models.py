"""`edge-node engines build|list|verify`, `thresholds fit`, `inspect`: the model tools."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from edge.commands.log_stream import log_to_stderr
from edge.config import Config, ConfigError, ModelsConfig, load_config
from edge.durable import fsync_dir
from edge.infer.backend import BackendError
from edge.infer.dataset import DatasetError, load_dataset
from edge.infer.engines import EngineCache
from edge.infer.fit import ScoreTable, fit_fusion, fit_thresholds, thresholds_to_mapping
from edge.infer.gallery import ReferenceGallery
from edge.infer.golden import golden_path, golden_scores, load_golden, stage_expectations
from edge.infer.inspector import ItemInspector
from edge.infer.int8 import Int8Sets, int8_acceptance, int8_sets
from edge.infer.manifest import (
    Manifest,
    ManifestError,
    load_manifest,
    sha256_file,
    write_manifest,
)
from edge.infer.offline import memory_inspector
from edge.infer.ood import is_out_of_distribution
from edge.infer.photo import PhotoError, load_photo
from edge.verdicts.policy import VerdictPolicy

#: memory_inspector lives in edge/infer/offline.py (training uses it too); tests and tools
#: take it from here.
__all__ = ["add_model_commands", "main", "memory_inspector"]

SubParsers = argparse._SubParsersAction


def _emit(text: str, *, err: bool = False) -> None:
    stream = sys.stderr if err else sys.stdout
    stream.write(text + "\n")
    stream.flush()


def _config(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config)
    if getattr(args, "manifest", None) is not None:
        return dataclasses.replace(cfg, models=dataclasses.replace(cfg.models,
                                                                   manifest=args.manifest))
    return cfg


def _inspect(args: argparse.Namespace) -> int:
    cfg = _config(args)
    inspector = memory_inspector(cfg.models, args.gallery)
    product = None if args.product is None else inspector.catalogue.get(args.product)
    if args.product is not None and product is None:
        raise ConfigError("--product", args.product,
                          f"a catalogue product ID ({', '.join(inspector.catalogue.ids())})")
    photo = load_photo(args.rgb, args.depth, product=product, product_id=args.product,
                       size=inspector.size, depth_unit_mm=args.depth_unit_mm)
    inference = inspector.infer([photo.record])[0]
    policy = VerdictPolicy.from_manifest(inspector.manifest, cfg.decision)
    verdict = policy.decide(photo.record, inference, now_ms=0.0)
    notes = list(photo.notes)
    if is_out_of_distribution(inference.ood):
        notes.append(f"out of distribution (score {inference.ood:.2f} >= 1): not like the "
                     f"parcels the models know; decision.out_of_distribution = "
                     f"{cfg.decision.out_of_distribution}")
    if not inference.has_gallery:
        notes.append("no reference gallery for this product: classifier (and geometry) only"
                     if args.product else "no --product: gallery and geometry checks skipped")
    out = {
        "damage_score": round(inference.damage, 5),
        "anomaly_score": None if inference.anomaly is None else round(inference.anomaly, 4),
        "geometry_score": None if inference.geometry is None else round(inference.geometry, 4),
        "fused_score": round(inference.fused, 5),
        "ood_score": None if inference.ood is None else round(inference.ood, 4),
        "threshold": policy.thresholds.fused[inference.combo],
        "inputs": inference.combo,
        "decision": verdict.decision.value,
        "reasons": [r.value for r in verdict.reasons],
        "per_type": {k: round(v, 4) for k, v in inference.per_type.items()},
        "findings": [{"type": f.type.value, "probability": round(f.probability, 4),
                      "box_px": f.box_px} for f in verdict.findings],
        "item_found": photo.item_found, "has_depth": photo.has_depth,
        "product_id": args.product, "threshold_version": verdict.threshold_version,
        "model_versions": dict(verdict.model_versions), "notes": notes,
    }
    if args.json:
        _emit(json.dumps(out))
    else:
        _print_inspect(out)
    return 0


def _print_inspect(out: dict[str, Any]) -> None:
    _emit(f"decision:  {out['decision'].upper()}  (fused {out['fused_score']:.4f}, threshold "
          f"{out['threshold']:.4f}, inputs {out['inputs']})")
    _emit(f"reasons:   {', '.join(out['reasons']) or '-'}")
    _emit(f"damage:    {out['damage_score']:.4f}   anomaly: {out['anomaly_score']}   "
          f"geometry: {out['geometry_score']}   ood: {out['ood_score']}")
    _emit("per type:  " + ", ".join(f"{k} {v:.3f}" for k, v in out["per_type"].items()))
    for note in out["notes"]:
        _emit(f"note:      {note}")


def _thresholds_fit(args: argparse.Namespace) -> int:
    cfg = _config(args)
    inspector = memory_inspector(cfg.models, None)
    data = load_dataset(args.data, limit=args.limit)
    if data.references:
        inspector.gallery = ReferenceGallery(None)
        for product, by_cam in data.references.items():
            for camera, crops in by_cam.items():
                inspector.learn_views(product, camera, [c.color for c in crops])
    table = ScoreTable.collect(data.items, inspector.infer(data.items))
    fusion = fit_fusion(table) if args.refit_fusion else inspector.fusion
    thresholds = fit_thresholds(table, fusion, args.target_fpr)
    raw = dict(inspector.manifest.raw)
    if args.refit_fusion:
        raw["fusion"] = {**fusion.to_mapping(), "geometry": raw["fusion"].get("geometry", {})}
    raw["thresholds"] = thresholds_to_mapping(thresholds, str(args.data), len(data.items))
    expected, golden = _refitted_golden(inspector, raw)
    if not args.dry_run:
        _write_fit(inspector.manifest, raw, expected)
    golden.update({k: dict(raw.get("golden") or {}).get(k) for k in ("file", "sha256")})
    summary = {"version": thresholds.version, "target_fpr": args.target_fpr,
               "fused": dict(thresholds.fused), "items": len(data.items),
               "nominal_items": int((~table.damaged).sum()), "written": not args.dry_run,
               "golden": golden}
    _emit(json.dumps(summary, indent=2))
    return 0


def _refitted_golden(inspector: ItemInspector, raw: dict[str, Any]
                     ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The golden expectations that `raw` changes, and what to report about them.

    The self-test compares fused scores, which depend on the fusion section; the model
    scores it compares do not, and thresholds are not compared: only a changed fusion
    needs new (fused) expectations, scored as the node will score them."""
    manifest = inspector.manifest
    report: dict[str, Any] = {"file": manifest.golden.get("file"), "recomputed": []}
    if raw["fusion"] == manifest.raw.get("fusion"):
        return {}, report
    golden = load_golden(golden_path(inspector), str(manifest.golden.get("sha256")))
    refitted = ItemInspector(dataclasses.replace(manifest, fusion=raw["fusion"], raw=raw),
                             inspector.embedding, inspector.damage,
                             gallery=ReferenceGallery(None), catalogue=inspector.catalogue,
                             cfg=inspector.cfg)
    fused = np.array([r.fused for r in golden_scores(refitted, golden)])
    report.update(recomputed=["fused"],
                  max_abs_change=float(np.abs(fused - golden.expected["fused"]).max()))
    return {"fused": fused}, report


def _write_fit(manifest: Manifest, raw: dict[str, Any], expected: dict[str, np.ndarray]) -> None:
    """Write the manifest and, if its expectations changed, the golden set it names.

    The new golden set gets a new, content-named file, renamed into place before the
    manifest names it and the old one deleted only after: a crash at any point leaves a
    manifest whose golden file exists with the sha256 it names."""
    if not expected:
        write_manifest(manifest.path, raw)
        return
    old_file = str(manifest.golden["file"])
    path = manifest.path.parent / old_file
    staged = stage_expectations(path, expected)  # durable already, under a staging name
    final: Path | None = None
    try:
        sha = sha256_file(staged)
        final = path.with_name(f"golden-{sha[:12]}.npz")
        staged.replace(final)  # its name follows from its content: known only once written
        fsync_dir(final.parent)  # the new file is there before any manifest names it
        raw["golden"] = {**raw["golden"], "sha256": sha,
                         "file": str(PurePosixPath(old_file).with_name(final.name))}
        # Durable (edge.durable) before the old golden file goes, or a power cut could
        # bring back the old manifest without its file.
        write_manifest(manifest.path, raw)
    except BaseException:
        staged.unlink(missing_ok=True)
        if final is not None and final != path:  # the old manifest still names `path`
            final.unlink(missing_ok=True)
        raise
    if final != path:
        path.unlink(missing_ok=True)


def _engines(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if args.action == "build" and cfg.models.backend == "onnxruntime":
        # The engines unit runs this before every start; the node Requires= it to succeed.
        _emit("edge-node: nothing to build for ONNX Runtime (models.backend: onnxruntime); "
              "engines are TensorRT plans")
        return 0
    manifest = load_manifest(cfg.models.manifest)
    cache = EngineCache(args.cache or cfg.models.engine_cache, dla_core=cfg.models.dla_core,
                        progress=lambda msg: _emit(f"  {msg}", err=True))
    rows = []
    sets = None
    if args.action == "build":
        _ = cache.builder  # no TensorRT or cuda-python: say so before minutes of preparation
        if "int8" in args.precision:
            sets = int8_sets(manifest)
    for spec in manifest.models.values():
        for precision in args.precision:
            if args.action == "build":
                _build(cache, spec, precision, sets, cfg.models)
            st = cache.verify(spec, precision) if args.action == "verify" else cache.status(
                spec, precision)
            rows.append({"model": spec.name, "precision": precision, "state": st.state,
                         "detail": st.detail, "plan": str(st.plan)})
    _emit(json.dumps(rows, indent=2))
    return 0 if all(r["state"] == "fresh" for r in rows) or args.action == "list" else 1


def _open_plan(models: ModelsConfig) -> Any:
    def open_plan(spec: Any, plan: Path) -> Any:
        from edge.infer.tensorrt import TensorRTBackend  # imports TensorRT: only where it runs

        return TensorRTBackend(spec, plan, max_batch=models.max_batch, dla_core=models.dla_core)
    return open_plan


def _build(cache: Any, spec: Any, precision: str, sets: Int8Sets | None,
           models: ModelsConfig) -> None:
    if precision == "fp16" or sets is None:
        cache.ensure(spec, precision)
        return
    fp16 = cache.ensure(spec, "fp16")  # the reference INT8 must match
    # Judged on held-out inputs, never on the ones it was calibrated on.
    accept = int8_acceptance(spec, fp16, sets.check[spec.name], _open_plan(models))
    cache.ensure(spec, "int8", calibration=sets.calibration[spec.name], accept=accept)


def _guarded(func: Any, log_level: str = "warning") -> Any:
    def run(args: argparse.Namespace) -> int:
        # stdout carries the command's output; logs go to whatever sys.stderr is at write time.
        log_to_stderr(log_level)
        try:
            return int(func(args))
        except (ManifestError, BackendError, DatasetError, PhotoError) as exc:
            _emit(f"edge-node: {exc}", err=True)
            return 2
    return run


def add_model_commands(sub: SubParsers[argparse.ArgumentParser]) -> None:
    """Register `engines`, `thresholds` and `inspect` on the `edge-node` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=None, help="node config YAML")
    common.add_argument("--manifest", type=Path, default=None,
                        help="engines/manifest.yaml (default: models.manifest of the config)")

    eng = sub.add_parser("engines", help="TensorRT engine cache: build, list, verify")
    eng_sub = eng.add_subparsers(dest="action", required=True)
    for action, text in (("build", "build missing or stale plans"), ("list", "show the cache"),
                         ("verify", "check plans' keys, hashes and that they load")):
        p = eng_sub.add_parser(action, help=text, parents=[common])
        p.add_argument("--cache", type=Path, default=None, help="default: models.engine_cache")
        p.add_argument("--precision", nargs="+", choices=("fp16", "int8"), default=["fp16"])
        p.set_defaults(handler=_guarded(_engines, "info"))

    thr = sub.add_parser("thresholds", help="operating thresholds")
    thr_sub = thr.add_subparsers(dest="action", required=True)
    fit = thr_sub.add_parser("fit", parents=[common],
                             help="fit the threshold for a target sideline rate on a dataset")
    fit.add_argument("--data", type=Path, required=True, help="synthetic or labelled dataset")
    fit.add_argument("--target-fpr", type=float, default=0.005,
                     help="share of good items allowed to the sideline")
    fit.add_argument("--limit", type=int, default=None, help="use the first N items")
    fit.add_argument("--refit-fusion", action="store_true", help="also refit fusion weights")
    fit.add_argument("--dry-run", action="store_true", help="print, do not write the manifest")
    fit.set_defaults(handler=_guarded(_thresholds_fit))

    ins = sub.add_parser("inspect", parents=[common], help="run the models on one photograph")
    ins.add_argument("--rgb", type=Path, required=True, help="colour image (any size)")
    ins.add_argument("--depth", type=Path, default=None,
                     help="height map PNG (uint16, height above the belt)")
    ins.add_argument("--depth-unit-mm", type=float, default=0.1,
                     help="mm per height-map unit (synthetic datasets: 0.1)")
    ins.add_argument("--product", default=None, help="catalogue product ID")
    ins.add_argument("--gallery", type=Path, default=None,
                     help="reference gallery directory (default: shipped references, in memory)")
    ins.add_argument("--json", action="store_true", help="one JSON object on stdout")
    ins.set_defaults(handler=_guarded(_inspect))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the model commands alone (tests; `python -m edge.commands.models`)."""
    parser = argparse.ArgumentParser(prog="edge-node")
    add_model_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        _emit(f"edge-node: {exc}", err=True)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
