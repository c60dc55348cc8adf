"""Reused image buffers for captured frames.

A camera delivers 1.5 MB per frame (colour and depth at 640x480). Allocated
fresh each time, those buffers go through glibc's heap: once glibc's dynamic
mmap threshold has risen past their size they are carved from the heap, and
frames that live for different times (queued, tracked, kept as an item's best
view) leave holes that make the heap creep. Allocating them with mmap instead
costs a page fault per 4 kB on every frame, doubling the CPU a frame costs
(BENCHMARKS.md). A pool hands out the same few buffers again and again.

A buffer goes back to its pool when nothing refers to its memory any more:
every slice and view of the array handed out keeps that array alive (it is
their base), and the pool waits for it to be collected. So a crop of a frame
that outlives the frame keeps the buffer out of the pool, and no live array
ever shares memory with a new frame.

A pool can also hand out preallocated `slots` first, such as rows of a
shared-memory file that the item-finding worker processes map: a depth image
captured into a slot reaches them without a copy (`slot_of` tells which).
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from typing import Protocol, runtime_checkable

import numpy as np


class FrameBufferPool:
    """Buffers of one shape and dtype, reused once every array using them is gone."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype | type, *,
                 keep: int = 32, slots: np.ndarray | None = None) -> None:
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.keep = keep  # free buffers kept for reuse; more are left to the allocator
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()
        self.allocated = 0  # buffers ever allocated: flat once the working set is reached
        self.reused = 0
        if slots is not None and (slots.shape[1:] != self.shape or slots.dtype != self.dtype
                                  or not slots[0].flags.c_contiguous):
            raise ValueError(f"slots of shape {slots.shape[1:]} {slots.dtype} do not fit a "
                             f"pool of {self.shape} {self.dtype}")
        self._slots = slots
        self._free_slots: deque[int] = deque(range(len(slots)) if slots is not None else ())
        self.slots_exhausted = 0  # takes that found every slot in use (an ordinary buffer)
        self.slots_peak = 0  # most slots in use at once: the slots whose pages are resident

    def take(self) -> np.ndarray:
        """An uninitialised, writable, C-contiguous array of the pool's shape and dtype."""
        with self._lock:
            # Last in, first out: the working set stays on the same few slots (resident and
            # warm in cache) instead of cycling through every page of the shared file.
            slot = self._free_slots.pop() if self._free_slots else None
            if slot is not None and self._slots is not None:
                self.slots_peak = max(self.slots_peak, len(self._slots) - len(self._free_slots))
            buf = None
            if slot is None:
                if self._slots is not None:
                    self.slots_exhausted += 1
                buf = self._free.pop() if self._free else None
                if buf is None:
                    self.allocated += 1
                else:
                    self.reused += 1
        if slot is not None:
            assert self._slots is not None
            out = np.asarray(self._slots[slot].data)
            weakref.finalize(out, self._slot_back, slot)
            return out
        if buf is None:
            buf = np.empty(self.shape, self.dtype)
        # Not a view of `buf`: views of views collapse to the array that owns the memory, so
        # a slice of `buf[...]` would not keep the handed-out array alive. Through a
        # memoryview, `out` owns nothing and is the base of every view taken from it.
        out = np.asarray(buf.data)
        weakref.finalize(out, self._give_back, buf)
        return out

    def slot_of(self, arr: np.ndarray) -> int | None:
        """The slot `arr` was handed out in (the whole slot, as taken), else None."""
        slots = self._slots
        if slots is None or arr.shape != self.shape or arr.dtype != self.dtype:
            return None
        offset = int(arr.__array_interface__["data"][0]) - int(
            slots.__array_interface__["data"][0])
        index, rest = divmod(offset, int(slots.strides[0]))
        if rest or not 0 <= index < len(slots) or not arr.flags.c_contiguous:
            return None
        return index

    @property
    def free(self) -> int:
        with self._lock:
            return len(self._free)

    def _give_back(self, buf: np.ndarray) -> None:
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(buf)

    def _slot_back(self, slot: int) -> None:
        with self._lock:
            self._free_slots.append(slot)


class FrameBuffers:
    """One pool per (shape, dtype), created on first use: a source's colour and depth."""

    def __init__(self, *, keep: int = 32) -> None:
        self._keep = keep
        self._pools: dict[tuple[tuple[int, ...], np.dtype], FrameBufferPool] = {}
        self._lock = threading.Lock()

    def provide(self, pool: FrameBufferPool) -> None:
        """Take buffers of `pool`'s shape and dtype from `pool` from now on (shared-memory
        slots, say); call before frames flow."""
        with self._lock:
            self._pools[(pool.shape, pool.dtype)] = pool

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


@runtime_checkable
class HasFrameBuffers(Protocol):
    """A frame source whose frames land in `frame_buffers` (so the node can provide
    shared-memory slots for depth)."""

    @property
    def frame_buffers(self) -> FrameBuffers: ...
