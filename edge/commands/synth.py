"""`edge-node synth dataset|record`: training sets and RealSense recordings of the belt."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import structlog

from edge.capture.recording import write_recording
from edge.catalogue import load_catalogue
from edge.config import Config, ConfigError, load_config
from edge.logs import configure_logging
from edge.sim.conveyor import SyntheticConveyor
from edge.sim.dataset import write_dataset

log = structlog.get_logger(__name__)


def add_synth_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    synth = sub.add_parser("synth", help="synthetic conveyor: datasets and recordings")
    ssub = synth.add_subparsers(dest="synth_command", metavar="SYNTH_COMMAND", required=True)

    ds = ssub.add_parser("dataset", help="write labelled item crops for training")
    ds.add_argument("--out", type=Path, required=True, help="output directory")
    ds.add_argument("--items", type=int, required=True, help="number of items")
    ds.add_argument("--seed", type=int, default=0, help="world seed")
    ds.add_argument("--damage-rate", type=float, default=0.5, help="fraction of damaged items")
    ds.add_argument("--confounder-rate", type=float, default=0.25,
                    help="fraction of products with damage-like prints")
    ds.add_argument("--references", type=int, default=3,
                    help="pristine reference views per product (for the gallery)")
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


def _dataset(args: argparse.Namespace) -> int:
    if args.items < 1:
        raise ConfigError("--items", args.items, "at least 1")
    if not 0.0 <= args.damage_rate <= 1.0:
        raise ConfigError("--damage-rate", args.damage_rate, "a fraction between 0 and 1")
    cfg = _load(args.config)
    counts = write_dataset(args.out, cfg, load_catalogue(), items=args.items, seed=args.seed,
                           damage_rate=args.damage_rate, confounder_rate=args.confounder_rate,
                           references=args.references)
    print(f"wrote {counts['items']} items ({counts['damaged']} damaged, {counts['crops']} crops) "
          f"and {counts['references']} reference views to {args.out}")
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
