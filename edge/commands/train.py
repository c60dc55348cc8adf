"""`edge-node train --data EXPORT --out CANDIDATE`: a candidate model set from a site's labels.

The damage head of the current models is fine-tuned on the labelled audit snapshots of an
`edge-node snapshots export` (optionally mixed with synthetic items), its fusion and
thresholds refitted on the site's held-out items, and everything written to a candidate
folder with the layout of `engines/` (edge/training/site.py). CPU only; needs the `train`
extra (torch), imported only once the labels are known to be enough.

Exit status: 0 written; 2 refused (too few or one-sided labels, missing extra, bad input);
1 failed on the way (nothing is left at `--out`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge.commands.log_stream import log_to_stderr
from edge.config import DEFAULT_MANIFEST, ConfigError
from edge.infer.manifest import ManifestError
from edge.training.progress import ProgressBar
from edge.training.site_data import (
    HELD_OUT_SHARE,
    MIN_DAMAGED,
    MIN_INTACT,
    SiteDataError,
    check_labels,
    export_labels,
)

TRAIN_EXTRA = "pip install 'conveyor-vision[train]'"


def _train(args: argparse.Namespace) -> int:
    log_to_stderr("warning")
    if args.synthetic < 0:
        raise ConfigError("--synthetic", args.synthetic, "0 or more synthetic items")
    if not 0.05 <= args.held_out <= 0.8:
        raise ConfigError("--held-out", args.held_out, "a share between 0.05 and 0.8")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        _err(f"edge-node train: {args.out} exists and is not empty: give a new folder for the "
             "candidate")
        return 2
    try:
        check_labels(args.data, export_labels(args.data), args.held_out)
    except SiteDataError as exc:
        _err(f"edge-node train: {exc}")
        return 2
    try:
        from edge.training.finetune import HeadError
        from edge.training.site import TrainError, TrainOptions, train_candidate
    except ModuleNotFoundError as exc:
        _err(f"edge-node train: {exc.name} is missing: training needs the train extra "
             f"({TRAIN_EXTRA})")
        return 2
    opts = TrainOptions(data=args.data, out=args.out, manifest=args.manifest,
                        synthetic=args.synthetic, epochs=args.epochs, lr=args.lr,
                        seed=args.seed, threads=args.threads, target_fpr=args.target_fpr,
                        version=args.version, held_out=args.held_out)
    bar = ProgressBar()
    try:
        result = train_candidate(opts, bar)
    except (SiteDataError, ManifestError, HeadError) as exc:
        bar.done()
        _err(f"edge-node train: {exc}")
        return 2
    except (TrainError, OSError) as exc:
        bar.done()
        _err(f"edge-node train: {exc}")
        return 1
    bar.done()
    held = result.metrics["held_out"]
    sys.stdout.write(json.dumps({
        "candidate": str(result.out), "version": result.version,
        "manifest_sha256": result.manifest_sha256,
        "held_out": {k: held[k] for k in ("items", "damaged", "intact")},
        "current": held["current"], "candidate_scores": held["candidate"],
        "training_seconds": result.metrics["training_seconds"]}, indent=2) + "\n")
    return 0


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
    p.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST,
                   help="the current models (default: the shipped engines/manifest.yaml)")
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
