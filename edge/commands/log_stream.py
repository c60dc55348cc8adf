"""Where a command's logs go: stdout carries the command's output, so logs go to stderr."""

from __future__ import annotations

import io
import sys
from typing import TextIO, cast

from edge.logs import configure_logging


class _Stderr(io.TextIOBase):
    """Whatever `sys.stderr` is when a line is written (a test's capture, a redirect made
    after logging was configured)."""

    def write(self, s: str) -> int:
        return sys.stderr.write(s)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def log_to_stderr(level: str) -> None:
    """Configure logging at `level` onto the current `sys.stderr`, whatever it is later."""
    configure_logging(level, stream=cast("TextIO", _Stderr()))
