"""The progress bar of training runs (they take minutes to an hour on a device's CPU)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """Stage, bar, share done and time so far on stderr: one line rewritten in place on a
    terminal, a line per stage otherwise (a log)."""

    def __init__(self, stream: TextIO | None = None, width: int = 30) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self.started = time.monotonic()
        self.live = self.stream.isatty()
        self._last = ""
        self._stage = ""

    def __call__(self, stage: str, fraction: float) -> None:
        filled = round(self.width * fraction)
        line = (f"{stage:<10} [{'#' * filled}{'.' * (self.width - filled)}] "
                f"{100 * fraction:5.1f}%  {time.monotonic() - self.started:6.0f} s")
        if self.live and line != self._last:  # the finetune step reports often
            self.stream.write("\r" + line)
        elif not self.live and stage != self._stage:
            self.stream.write(line + "\n")
        else:
            return
        self.stream.flush()
        self._last, self._stage = line, stage

    def done(self) -> None:
        if self.live:
            self.stream.write("\n")
            self.stream.flush()
