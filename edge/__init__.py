"""conveyor-vision edge node: finds damaged items on a conveyor before the divert point."""

import os

# The gallery search is one small matrix product per crop: OpenBLAS's default of one thread
# per core makes it 2-4x slower on a 2-core device busy with capture and ONNX Runtime. This
# must be set before numpy loads; an explicit setting in the environment wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives every thread that allocates its own heap arena and keeps what is freed in
    it: with a dozen threads passing 1.5 MB frames around, that is ~35 MB of resident memory
    (measured over a 200 s demo: 463 -> 430 MB). Two arenas suffice; must run before the
    threads start. An explicit MALLOC_ARENA_MAX in the environment wins; not glibc: no-op."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    import contextlib
    import ctypes

    m_arena_max = -8  # from glibc's malloc.h
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(m_arena_max, arenas)


_limit_malloc_arenas()

__version__ = "0.1.0"
