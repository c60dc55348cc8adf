"""`edge-node synth dataset|record`: training sets and RealSense recordings of the belt."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import structlog

from edge.capture.recording import write_recording
from edge.catalogue import Catalogue, load_catalogue
from edge.config import Config, ConfigError, load_config
from edge.logs import configure_logging
from edge.sim.conveyor import SyntheticConveyor
from edge.sim.dataset import SPLIT_DEFAULTS, DatasetSpec, write_dataset
from edge.sim.products import SPLITS, generate_catalogue

log = structlog.get_logger(__name__)


def add_synth_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    synth = sub.add_parser("synth", help="synthetic conveyor: datasets and recordings")
    ssub = synth.add_subparsers(dest="synth_command", metavar="SYNTH_COMMAND", required=True)

    ds = ssub.add_parser(
        "dataset", help="write labelled item crops for training",
        description="Without --split: items of the node's catalogue, severe damage, no "
        "nuisances. With --split: a catalogue of the split's own products, damage across the "
        "severity spectrum and the line's nuisances; defaults per split: "
        + "; ".join(f"{split}: seed {spec.seed}, {spec.items} items, {products} products, "
                    f"damage rate {spec.damage_rate}" for split, (spec, products)
                    in SPLIT_DEFAULTS.items()) + ".")
    ds.add_argument("--out", type=Path, required=True, help="output directory")
    ds.add_argument("--split", choices=SPLITS, default=None,
                    help="a benchmark split with products no other split has")
    ds.add_argument("--items", type=int, default=None,
                    help="number of items (0: references only; default: the split's)")
    ds.add_argument("--products", type=int, default=None,
                    help="products in the split's catalogue (default: the split's)")
    ds.add_argument("--seed", type=int, default=None, help="world seed (default: the split's, "
                    "or 0)")
    ds.add_argument("--damage-rate", type=float, default=None,
                    help="fraction of damaged items (default: the split's, or 0.5)")
    ds.add_argument("--confounder-rate", type=float, default=None,
                    help="fraction of items with damage-like prints (default: 0.15 with "
                    "--split, else 0.25)")
    ds.add_argument("--severity-mix", type=_shares, default=None, metavar="S,M,V",
                    help="shares of subtle, moderate, severe damage (default: 0.4,0.35,0.25 "
                    "with --split, else severe only)")
    ds.add_argument("--nuisance", type=float, default=None,
                    help="lighting, shadows, belt dirt, blur, depth dropouts, 0..1 (default: 1 "
                    "with --split, else 0)")
    ds.add_argument("--touching-rate", type=float, default=None,
                    help="fraction of items inducted touching the one before (default: 0.03 "
                    "with --split, else 0)")
    ds.add_argument("--references", type=int, default=None,
                    help="pristine reference views per product, for the gallery (default: 3)")
    ds.add_argument("--workers", type=int, default=None,
                    help="worker processes (default: one per CPU core for large sets)")
    ds.add_argument("--config", type=Path, default=None, help="node config (cameras, belt)")
    ds.set_defaults(handler=_dataset)

    rec = ssub.add_parser("record", help="write a RealSense .db3 recording per camera")
    rec.add_argument("--out", type=Path, required=True,
                     help="FILE.db3; with several cameras FILE-<camera>.db3 each")
    rec.add_argument("--seconds", type=float, required=True, help="length of the recording")
    rec.add_argument("--seed", type=int, default=0, help="world seed")
    rec.add_argument("--camera", default=None, help="record only this camera ID")
    rec.add_argument("--items-per-second", type=float, default=None, help="induct rate")
    rec.add_argument("--damage-rate", type=float, default=None, help="fraction of damaged items")
    rec.add_argument("--config", type=Path, default=None, help="node config (cameras, belt)")
    rec.add_argument("--uncompressed", action="store_true",
                     help="raw frames (2x the size; playback without LZ4 decoding)")
    rec.set_defaults(handler=_record)


def _load(path: Path | None) -> Config:
    cfg = load_config(path)
    configure_logging(cfg.logging.level, cfg.logging.format, node_id=cfg.node.node_id,
                      line_id=cfg.node.line_id)
    return cfg


def _shares(text: str) -> tuple[float, ...]:
    try:
        shares = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: three numbers, e.g. 0.4,0.35,0.25") from None
    if len(shares) != 3 or min(shares) < 0 or sum(shares) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: three shares >= 0, not all 0")
    return shares


def _dataset_spec(args: argparse.Namespace) -> tuple[DatasetSpec, Catalogue]:
    """The dataset the options ask for, and its products."""
    if args.split is None:
        if args.items is None:
            raise ConfigError("--items", None, "a number of items (or --split)")
        if args.products is not None:
            raise ConfigError("--products", args.products, "only with --split")
        spec = DatasetSpec(items=args.items, seed=0, damage_rate=0.5, confounder_rate=0.25,
                           references=3)
        catalogue = load_catalogue()
    else:
        spec, products = SPLIT_DEFAULTS[args.split]
        products = products if args.products is None else args.products
        if products < 1:
            raise ConfigError("--products", products, "at least 1")
        catalogue = None  # drawn below, from the final seed
    overrides = {"items": args.items, "seed": args.seed, "damage_rate": args.damage_rate,
                 "confounder_rate": args.confounder_rate, "severity_mix": args.severity_mix,
                 "nuisance": args.nuisance, "touching_rate": args.touching_rate,
                 "references": args.references}
    spec = dataclasses.replace(spec, **{k: v for k, v in overrides.items() if v is not None})
    for key in ("items", "seed", "references"):
        if getattr(spec, key) < 0:
            raise ConfigError(f"--{key}", getattr(spec, key), "0 or more")
    for key in ("damage_rate", "confounder_rate", "nuisance", "touching_rate"):
        if not 0.0 <= getattr(spec, key) <= 1.0:
            raise ConfigError(f"--{key.replace('_', '-')}", getattr(spec, key),
                              "a fraction between 0 and 1")
    if catalogue is None:
        assert spec.split is not None
        catalogue = generate_catalogue(spec.split, products, spec.seed)
    return spec, catalogue


def _dataset(args: argparse.Namespace) -> int:
    spec, catalogue = _dataset_spec(args)
    cfg = _load(args.config)
    work = spec.items + spec.references * len(catalogue.products)
    workers = args.workers or (min(len(os.sched_getaffinity(0)), 8) if work >= 200 else 1)
    started = time.monotonic()
    counts = write_dataset(args.out, cfg, catalogue, spec, workers=workers)
    split = f" of the {spec.split} split" if spec.split else ""
    print(f"wrote {counts['items']} items{split} ({counts['damaged']} damaged, "
          f"{counts['crops']} crops) and {counts['references']} reference views of "
          f"{len(catalogue.products)} products to {args.out} in "
          f"{time.monotonic() - started:.0f} s ({workers} workers)")
    return 0


def recording_paths(out: Path, camera_ids: list[str]) -> dict[str, Path]:
    """Where each camera's recording goes."""
    if len(camera_ids) == 1:
        return {camera_ids[0]: out}
    return {c: out.with_name(f"{out.stem}-{c}{out.suffix or '.db3'}") for c in camera_ids}


def _record(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    syn = cfg.synthetic
    if args.items_per_second is not None:
        syn = dataclasses.replace(syn, items_per_second=args.items_per_second)
    syn = dataclasses.replace(syn, seed=args.seed)
    if args.damage_rate is not None:
        syn = dataclasses.replace(syn, damage_rate=args.damage_rate)
    world = SyntheticConveyor(syn, cfg.belt, cfg.cameras, load_catalogue(), start_ms=0.0)
    cams = [args.camera] if args.camera else list(world.camera_ids)
    unknown = [c for c in cams if c not in world.camera_ids]
    if unknown:
        print(f"edge-node: no camera {unknown[0]!r}; cameras are {list(world.camera_ids)}",
              file=sys.stderr)
        return 2
    for cam, path in recording_paths(args.out, cams).items():
        count = round(args.seconds * world.fps(cam))
        frames = (world.render(cam, k) for k in range(count))
        write_recording(path, frames, world.fps(cam), compress=not args.uncompressed)
        print(f"{cam}: {count} frames -> {path}")
    return 0
