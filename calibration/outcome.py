"""How an `edge-calibrate` command ends: exit codes, a refused result, where reports go."""

from __future__ import annotations

import argparse
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_INPUT = 0, 1, 2


class Refused(RuntimeError):  # noqa: N818 - an outcome, not a bug
    """The command ran but its result is not good enough to save or pass (exit 1)."""


def report_dir(args: argparse.Namespace, default: Path) -> Path:
    return Path(args.report) if args.report else default
