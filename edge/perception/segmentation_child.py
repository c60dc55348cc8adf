"""The item-finding worker process: maps the shared depth ring, answers jobs with detections.

Run as `python -m edge.perception.segmentation_child FD` by `SegmentationWorkers`; what
travels between the node and a worker (jobs, detections on the wire) is defined here, so that
both sides read it from one module.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, fields
from multiprocessing.connection import Connection
from typing import Any

import cv2
import numpy as np

from edge.heap import glibc_malloc_trim
from edge.perception.segmentation import Detection, ItemSegmenter
from edge.types import Frame

#: Detection fields that travel back from a worker (the frame stays in the node).
WIRE_FIELDS = tuple(f.name for f in fields(Detection) if f.name != "frame")

_NO_COLOR = np.zeros((0, 0, 3), np.uint8)

@dataclass(frozen=True, slots=True)
class View:
    camera: int  # index into the pool's camera list
    index: int
    timestamp_ms: float
    depth_scale_m: float
    row: int  # where its depth is in the shared file: a ring slot or a frame slot

@dataclass(frozen=True, slots=True)
class Job:
    """All views of one frameset: one message each way per frameset."""

    job_id: int
    views: tuple[View, ...]

def return_free_heap() -> None:
    """Hand the float64 temporaries of the belt-plane set-up back to the OS (glibc keeps
    freed heap otherwise: ~18 MB per worker, for the life of the process)."""
    trim = glibc_malloc_trim()
    if trim is not None:  # not glibc: nothing to trim
        trim()

def wire(det: Detection) -> tuple[Any, ...]:
    """A detection as plain values, its mask packed 8 pixels a byte: a frameset's masks are
    ~170 kB as bools, and the bytes cost more to pickle and pass than to pack."""
    return tuple((np.packbits(det.mask), det.mask.shape) if name == "mask"
                 else getattr(det, name) for name in WIRE_FIELDS)

def unwire(values: tuple[Any, ...], frame: Frame) -> Detection:
    fields_ = dict(zip(WIRE_FIELDS, values, strict=True))
    packed, (h, w) = fields_["mask"]
    fields_["mask"] = np.unpackbits(packed, count=h * w).reshape(h, w).view(np.bool_)
    return Detection(**fields_, frame=frame)

def worker_main(fd: int) -> None:
    """One worker: map the ring, then answer jobs until told to stop or the node is gone."""
    # The node decides when to stop (it may still need us to finish items on SIGTERM).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    cv2.setNumThreads(1)  # one process per core is the parallelism
    conn = Connection(fd)
    try:
        ring_file, shape, cameras, views, cfg = conn.recv()
        ring = np.memmap(ring_file, np.uint16, "r", shape=shape).view(np.ndarray)
        segmenters = {cam: ItemSegmenter(cam, views[cam][0], views[cam][1], cfg)
                      for cam in cameras}
        return_free_heap()
    except Exception as exc:  # reported to the node, which raises it
        conn.send(f"{type(exc).__name__}: {exc}")
        return
    conn.send(time.process_time())  # ready
    parent = os.getppid()
    while True:
        if not conn.poll(1.0):
            if os.getppid() != parent:
                return  # orphaned: the node was killed
            continue
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        found: list[tuple[int, list[tuple[Any, ...]]]] = []
        result: list[tuple[int, list[tuple[Any, ...]]]] | str = found
        try:
            for view in job.views:
                cam = cameras[view.camera]
                seg = segmenters[cam]
                frame = Frame(camera_id=cam, index=view.index, timestamp_ms=view.timestamp_ms,
                              color=_NO_COLOR, depth=ring[view.row, view.camera],
                              depth_scale_m=view.depth_scale_m, intrinsics=seg.plane.intrinsics)
                found.append((view.camera, [wire(d) for d in seg.detect(frame)]))
        except Exception as exc:  # reported to the node, which raises it
            result = f"{type(exc).__name__}: {exc}"
        try:
            conn.send((job.job_id, time.process_time(), result))
        except OSError:
            return


if __name__ == "__main__":
    worker_main(int(sys.argv[1]))
