"""Reused frame buffers: a buffer is handed out again only once nothing can see its memory."""

from __future__ import annotations

import threading

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.capture.buffers import FrameBufferPool, FrameBuffers

SHAPE = (6, 8)


# Each step: take a new buffer, keep a slice/view/reshape of a held array, or drop one.
_steps = st.lists(st.tuples(st.sampled_from(["take", "slice", "transpose", "flat", "drop"]),
                            st.integers(0, 30)), min_size=1, max_size=60)


@settings(max_examples=200, deadline=None)
@given(_steps, st.sampled_from([0, 3]))
def test_no_live_array_shares_memory_with_a_buffer_handed_out_later(
        steps: list[tuple[str, int]], slots: int) -> None:
    """Whatever views of frames a consumer keeps (crops, transposes, flattened copies of the
    view), a new frame never lands in memory one of them still shows: every array keeps the
    value written into its frame. The same with preallocated slots (and more frames held
    than there are slots)."""
    pool = FrameBufferPool(SHAPE, np.uint16, keep=4,
                           slots=np.empty((slots, *SHAPE), np.uint16) if slots else None)
    held: list[tuple[int, np.ndarray]] = []  # (value written into its frame, array)
    value = 0
    for op, k in steps:
        if op == "take" or not held:
            value += 1
            arr = pool.take()
            arr.fill(value)
            held.append((value, arr))
        elif op == "drop":
            held.pop(k % len(held))
        else:
            v, arr = held[k % len(held)]
            view = {"slice": arr[1:4, 2:] if arr.ndim == 2 else arr[3:],
                    "transpose": arr.T, "flat": arr.reshape(-1)}[op]
            held.append((v, view))
        for v, arr in held:
            assert (arr == v).all()
    assert pool.allocated <= value


def test_a_steady_consumer_reuses_the_same_buffers() -> None:
    """Frames taken and let go one at a time: the pool allocates once. Frames held: it
    allocates one per frame, and keeps at most `keep` of them once they are all let go."""
    pool = FrameBufferPool(SHAPE, np.uint8, keep=3)
    for _ in range(100):
        frame = pool.take()
        frame[0, 0] = 1
        del frame
    assert pool.allocated == 1
    assert pool.reused == 99

    held = [pool.take() for _ in range(10)]
    assert pool.allocated == 10  # the one free buffer, then nine new ones
    crop = held[0][2:4, 2:4]
    held.clear()
    assert pool.free == 3  # the crop keeps one buffer out; of the other nine, three are kept
    del crop
    assert pool.free == 3


def test_buffers_are_writable_contiguous_and_of_the_pool_shape() -> None:
    buffers = FrameBuffers()
    depth = buffers.take((48, 64), np.uint16)
    color = buffers.copy_of(np.arange(48 * 64 * 3, dtype=np.uint8).reshape(48, 64, 3))
    assert depth.shape == (48, 64)
    assert depth.dtype == np.uint16
    assert color.flags.c_contiguous
    assert color.flags.writeable
    assert color[0, 0, 2] == 2
    assert color[-1, -1, -1] == (48 * 64 * 3 - 1) % 256
    assert buffers.allocated == 2


def test_threads_taking_and_dropping_never_share_a_buffer() -> None:
    """Capture threads take, any thread lets go: no two live frames ever share memory."""
    pool = FrameBufferPool(SHAPE, np.int64, keep=8)
    errors: list[str] = []

    def run(tag: int) -> None:
        held = []
        for i in range(2000):
            arr = pool.take()
            arr.fill(tag * 10_000 + i)
            held.append((tag * 10_000 + i, arr))
            if len(held) > 3:
                v, old = held.pop(0)
                if not (old == v).all():
                    errors.append(f"thread {tag}: frame {v} was overwritten")

    threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert pool.allocated <= 4 * 5  # the working set, not one per frame


def test_slots_are_handed_out_first_and_recognised_only_whole() -> None:
    """With slots (rows of a shared-memory file, say), the pool hands those out first and
    `slot_of` names the slot of a whole handed-out array, not of a slice or another array;
    when every slot is in use it falls back to ordinary buffers and counts that."""
    rows = np.zeros((3, 2, *SHAPE), np.uint16)  # slots interleaved with another camera's
    pool = FrameBufferPool(SHAPE, np.uint16, slots=rows[:, 1])
    frames = [pool.take() for _ in range(3)]
    assert sorted(pool.slot_of(f) for f in frames) == [0, 1, 2]  # type: ignore[type-var]
    for f in frames:
        f.fill(7)
    del f
    assert (rows[:, 1] == 7).all()
    assert (rows[:, 0] == 0).all()
    assert pool.slot_of(frames[0][1:]) is None
    assert pool.slot_of(np.zeros(SHAPE, np.uint16)) is None
    assert pool.slot_of(rows[0, 0]) is None  # the other camera's row
    extra = pool.take()
    assert pool.slot_of(extra) is None
    assert pool.slots_exhausted == 1
    assert pool.slots_peak == 3
    freed = pool.slot_of(frames.pop())
    again = pool.take()
    assert pool.slot_of(again) == freed
