"""Reused image buffers for captured frames.

A camera delivers 1.5 MB per frame (colour and depth at 640x480). Allocated
fresh each time, those buffers go through glibc's heap: once glibc's dynamic
mmap threshold has risen past their size they are carved from the heap, and
frames that live for different times (queued, tracked, kept as an item's best
view) leave holes that make the heap creep. Allocating them with mmap instead
costs a page fault per 4 kB on every frame (measured: 7 -> 14 ms of CPU per
frame). A pool hands out the same few buffers again and again.

A buffer goes back to its pool when nothing refers to its memory any more:
every slice and view of the array handed out keeps that array alive (it is
their base), and the pool waits for it to be collected. So a crop of a frame
that outlives the frame keeps the buffer out of the pool, and no live array
ever shares memory with a new frame.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np


class FrameBufferPool:
    """Buffers of one shape and dtype, reused once every array using them is gone."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype | type, *,
                 keep: int = 32) -> None:
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.keep = keep  # free buffers kept for reuse; more are left to the allocator
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()
        self.allocated = 0  # buffers ever allocated: flat once the working set is reached
        self.reused = 0

    def take(self) -> np.ndarray:
        """An uninitialised, writable, C-contiguous array of the pool's shape and dtype."""
        with self._lock:
            buf = self._free.pop() if self._free else None
            if buf is None:
                self.allocated += 1
            else:
                self.reused += 1
        if buf is None:
            buf = np.empty(self.shape, self.dtype)
        # Not a view of `buf`: views of views collapse to the array that owns the memory, so
        # a slice of `buf[...]` would not keep the handed-out array alive. Through a
        # memoryview, `out` owns nothing and is the base of every view taken from it.
        out = np.asarray(buf.data)
        weakref.finalize(out, self._give_back, buf)
        return out

    @property
    def free(self) -> int:
        with self._lock:
            return len(self._free)

    def _give_back(self, buf: np.ndarray) -> None:
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(buf)


class FrameBuffers:
    """One pool per (shape, dtype), created on first use: a source's colour and depth."""

    def __init__(self, *, keep: int = 32) -> None:
        self._keep = keep
        self._pools: dict[tuple[tuple[int, ...], np.dtype], FrameBufferPool] = {}
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        key = (tuple(shape), np.dtype(dtype))
        pool = self._pools.get(key)
        if pool is None:
            with self._lock:
                pool = self._pools.setdefault(key, FrameBufferPool(key[0], key[1],
                                                                   keep=self._keep))
        return pool.take()

    def copy_of(self, src: np.ndarray) -> np.ndarray:
        """`src` copied into a pooled buffer (C-contiguous)."""
        out = self.take(src.shape, src.dtype)
        np.copyto(out, src)
        return out

    @property
    def allocated(self) -> int:
        return sum(p.allocated for p in list(self._pools.values()))
