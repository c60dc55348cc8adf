"""`edge-node train --data EXPORT --out CANDIDATE`: a candidate model set from a site's labels.

The damage head of the current models is fine-tuned on the labelled audit snapshots of an
`edge-node snapshots export` (optionally mixed with synthetic items), its fusion and
thresholds refitted on the site's held-out items, and everything written to a candidate
folder with the layout of `engines/` (edge/training/site.py). CPU only; needs the `train`
extra (torch), imported only once the labels are known to be enough.

Both models score against the node's reference gallery, read and never written: `--gallery
DIR`, or the `models.gallery_dir` of `--config`; with neither, the manifest's shipped views
(products the site added to its gallery then get no anomaly score: the command warns).

Exit status: 0 written; 2 refused (too few or one-sided labels, missing extra, bad input);
1 failed on the way (nothing is left at `--out`). Warnings go to stderr and into the model
card.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge.commands.log_stream import log_to_stderr
from edge.config import ConfigError, load_config
from edge.infer.backend import BackendError
from edge.infer.dataset import DatasetError
from edge.infer.manifest import ManifestError
from edge.training.progress import ProgressBar
from edge.training.site_data import (
    HELD_OUT_SHARE,
    MIN_DAMAGED,
    MIN_INTACT,
    SiteDataError,
    check_labels,
    check_out,
    export_labels,
)

TRAIN_EXTRA = "pip install 'conveyor-vision[train]'"


def _check_args(args: argparse.Namespace) -> None:
    """ConfigError (exit 2, naming the option) for a value training cannot use."""
    if args.synthetic < 0:
        raise ConfigError("--synthetic", args.synthetic, "0 or more synthetic items")
    if args.epochs < 1:
        raise ConfigError("--epochs", args.epochs, "1 or more passes")
    if not args.lr > 0:
        raise ConfigError("--lr", args.lr, "a learning rate above 0")
    if args.threads < 1:
        raise ConfigError("--threads", args.threads, "1 or more CPU threads")
    if args.target_fpr is not None and not 0.0 < args.target_fpr < 0.5:
        raise ConfigError("--target-fpr", args.target_fpr, "a share above 0 and below 0.5")
    if not 0.05 <= args.held_out <= 0.8:
        raise ConfigError("--held-out", args.held_out, "a share between 0.05 and 0.8")
    if args.gallery is not None and not args.gallery.is_dir():
        raise ConfigError("--gallery", str(args.gallery), "a reference gallery folder")


def _models(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """(the current manifest, the node's gallery folder or None) from the options and the
    node's config."""
    cfg = load_config(args.config)
    manifest: Path = args.manifest or cfg.models.manifest
    if args.gallery is not None:
        return manifest, args.gallery
    if args.config is None:
        return manifest, None
    gallery = Path(cfg.models.gallery_dir)
    if not gallery.is_dir():
        _err(f"edge-node train: warning: {args.config}: models.gallery_dir {gallery} is not a "
             "folder: scoring against the shipped reference views only")
        return manifest, None
    return manifest, gallery


def _train(args: argparse.Namespace) -> int:
    log_to_stderr("warning")
    _check_args(args)
    try:
        check_out(args.out)
        check_labels(args.data, export_labels(args.data), args.held_out)
    except SiteDataError as exc:
        _err(f"edge-node train: {exc}")
        return 2
    manifest, gallery = _models(args)
    try:
        from edge.training.finetune import HeadError
        from edge.training.site import TrainError, TrainOptions, train_candidate
    except ModuleNotFoundError as exc:
        _err(f"edge-node train: {exc.name} is missing: training needs the train extra "
             f"({TRAIN_EXTRA})")
        return 2
    opts = TrainOptions(data=args.data, out=args.out, manifest=manifest,
                        synthetic=args.synthetic, epochs=args.epochs, lr=args.lr,
                        seed=args.seed, threads=args.threads, target_fpr=args.target_fpr,
                        version=args.version, held_out=args.held_out, gallery=gallery)
    bar = ProgressBar()
    try:
        result = train_candidate(opts, bar)
    except (SiteDataError, ManifestError, HeadError) as exc:
        bar.done()
        _err(f"edge-node train: {exc}")
        return 2
    except TrainError as exc:
        bar.done()
        _err(f"edge-node train: failed: {' '.join(str(exc).split())}")
        return 1
    except (OSError, BackendError, DatasetError, ValueError) as exc:
        bar.done()
        _err(f"edge-node train: failed: {_one_line(exc)}")
        return 1
    bar.done()
    for warning in result.warnings:
        _err(f"edge-node train: warning: {warning}")
    held = result.metrics["held_out"]
    sys.stdout.write(json.dumps({
        "candidate": str(result.out), "version": result.version,
        "manifest_sha256": result.manifest_sha256,
        "held_out": {k: held[k] for k in ("items", "damaged", "intact")},
        "target_fpr": result.metrics["target_fpr"],
        "current": _summary(held["current"]), "candidate_scores": _summary(held["candidate"]),
        "training_seconds": result.metrics["training_seconds"],
        "warnings": result.warnings}, indent=2) + "\n")
    return 0


def _summary(side: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in side.items() if k != "by_combination"}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


def add_train_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `train` on the `edge-node` parser."""
    p = sub.add_parser(
        "train", help="fine-tune the damage head on a site's labelled snapshots (a candidate)",
        description=f"Needs at least {MIN_DAMAGED} damaged and {MIN_INTACT} intact labelled "
        "items in the export (edge-node snapshots export).")
    p.add_argument("--data", type=Path, required=True,
                   help="folder written by `edge-node snapshots export`")
    p.add_argument("--out", type=Path, required=True,
                   help="the candidate folder to write (new or empty)")
    p.add_argument("--manifest", type=Path, default=None,
                   help="the current models (default: models.manifest of the config, the "
                   "shipped engines/manifest.yaml without one)")
    p.add_argument("--config", type=Path, default=None,
                   help="the node's config YAML: models.manifest and models.gallery_dir "
                   "(default: the embedded defaults)")
    p.add_argument("--gallery", type=Path, default=None,
                   help="the node's reference gallery folder, read only (default: "
                   "models.gallery_dir of --config; without --config the shipped views)")
    p.add_argument("--synthetic", type=int, default=0,
                   help="synthetic items mixed into training (keeps what the site did not show)")
    p.add_argument("--epochs", type=int, default=6, help="passes over the training items")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--held-out", type=float, default=HELD_OUT_SHARE,
                   help="share of the site's items held out for fitting and comparison")
    p.add_argument("--target-fpr", type=float, default=None,
                   help="share of good items allowed to the sideline (default: the current "
                   "thresholds' target)")
    p.add_argument("--version", default=None,
                   help="the candidate's version (default: the current one + a site stamp)")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch, ONNX Runtime)")
    p.set_defaults(handler=_train)
