"""Process-wide settings the node runs with, applied once by the command that starts it.

Kept out of `edge/__init__.py` so that importing a module of the package (the calibration
tool reading `edge.types`, a test) leaves the process as it was. This module imports nothing
heavy: it must run before numpy loads.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys

#: glibc's `M_ARENA_MAX` from malloc.h.
_M_ARENA_MAX = -8


def tune_process(malloc_arenas: int = 2) -> None:
    """One BLAS thread and few malloc arenas, unless the environment says otherwise.

    The gallery search is one small matrix product per crop: OpenBLAS's default of one thread
    per core slows it down on a device whose cores already run capture and inference. The
    setting only takes effect before numpy loads. glibc gives every thread that allocates its
    own heap arena and keeps what is freed in it; with a dozen threads passing frames around
    that costs resident memory (BENCHMARKS.md, memory), so two arenas are enough. Not glibc,
    or an explicit `MALLOC_ARENA_MAX`: left alone.
    """
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, malloc_arenas)
