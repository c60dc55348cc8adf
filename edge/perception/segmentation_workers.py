"""Item finding in worker processes: `ItemSegmenter.detect` off the GIL.

Segmentation is thousands of small numpy/OpenCV calls per frame that hold
the GIL between them, so more threads only add switching (a thread per
camera made the node slower: BENCHMARKS.md). Worker processes run it in
parallel for real. The depth images are in one shared-memory file (in
/dev/shm, mapped by every process, removed on close, or by the next node if
this one was killed): the cameras capture depth straight into its frame
slots (`depth_pool`), and a frame from anywhere else is copied into one of
its ring slots (one per frameset in flight). Only the small job tuples and
the detections (boxes and item masks) are pickled.

A job is one frameset (all its cameras: one message each way) and goes to
the least busy worker; results are consumed strictly in submission order, so
tracking sees framesets in time order. A worker that dies is replaced, and
the jobs it held are done in the calling thread: a crash costs time, never
an item. A worker that cannot be replaced leaves the pool (with none left,
every frameset is searched in the calling thread). A frameset whose search
raised comes back with the error, which `detections` raises: it costs that
frameset, as in one thread, and the frames after it flow on.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import structlog

from edge.capture.buffers import FrameBufferPool
from edge.config import ItemsConfig
from edge.perception.segmentation import Detection, ItemSegmenter
from edge.perception.segmentation_child import Job, View, unwire
from edge.types import FrameSet, U16Array

log = structlog.get_logger(__name__)

_SHM_DIRS = (Path("/dev/shm"), Path(tempfile.gettempdir()))
_RING_PREFIX = "cv-depth-ring-"


@dataclass(slots=True)
class _Worker:
    name: str
    process: subprocess.Popen[bytes]
    conn: Connection
    outstanding: deque[Job]
    cpu_s: float = 0.0  # the worker's own CPU time, as it last reported


class Ticket:
    """One submitted frameset and, once they are in, its detections by camera."""

    __slots__ = ("error", "frameset", "job_id", "results", "slot")

    def __init__(self, frameset: FrameSet, slot: int) -> None:
        self.frameset = frameset
        self.slot = slot
        self.job_id = -1
        self.results: dict[str, list[Detection]] | None = None
        self.error: str | None = None  # the search raised: what it said


class SegmentationWorkers:
    """A pool of processes that find items in depth images, results in submission order."""

    def __init__(self, segmenters: Mapping[str, ItemSegmenter], cfg: ItemsConfig,
                 workers: int, *, in_flight: int | None = None,
                 frame_slots: int = 48) -> None:
        if workers < 1:
            raise ValueError("SegmentationWorkers needs at least one worker")
        self._segmenters = dict(segmenters)
        self._cameras = list(self._segmenters)
        self._cfg = cfg
        self._shape = _common_shape(self._segmenters)
        # Four framesets queued per worker: results are collected in order, so with two
        # per worker one that finished early sat idle while another held the oldest job
        # (BENCHMARKS.md, item finding).
        self.in_flight = in_flight if in_flight is not None else 4 * workers
        h, w = self._shape
        # Rows 0..in_flight-1: the ring; the rest: frame slots the cameras capture into.
        # A page is resident once used and stays so (tmpfs): at most frame_slots frames per
        # camera. Live cameras use a few; a recording read as fast as possible uses most of
        # them (the sync holds one camera's frames until the other's catch up), so fewer
        # slots would leave many frames to be copied. Beyond them, frames get ordinary
        # buffers and are copied into the ring.
        self._slot_shape = (self.in_flight + frame_slots, len(self._cameras), h, w)
        self._file = _ring_file(int(np.prod(self._slot_shape)) * 2)
        # A plain ndarray over the mapping: np.memmap's subclass bookkeeping on every slice
        # showed up in profiles of the node's hot path.
        self._map = np.memmap(self._file, np.uint16, "r+", shape=self._slot_shape)
        self._ring: U16Array = self._map.view(np.ndarray)
        self._depth_pools = {
            cam: FrameBufferPool((h, w), np.uint16, slots=self._ring[self.in_flight:, k])
            for k, cam in enumerate(self._cameras)} if frame_slots else {}
        self.frames_shared = 0  # depth images the workers read where capture put them
        self.frames_copied = 0  # depth images copied into the ring first
        self._views = {cam: (seg.plane.intrinsics, seg.plane.pose)
                       for cam, seg in self._segmenters.items()}
        self._free = deque(range(self.in_flight))
        self._tickets: deque[Ticket] = deque()
        self._next_job = 0
        self._pending: dict[int, Ticket] = {}
        self.respawns = 0
        self.jobs = 0  # frames searched by workers
        self._cpu_retired = 0.0  # CPU of workers that died
        self._peak_at_close = 0.0
        self._private_at_close = 0.0
        self.jobs_done_here = 0  # jobs a dead worker left behind, done in the caller
        self._closed = False
        self._workers: list[_Worker] = []
        try:
            for k in range(workers):
                self._workers.append(self._spawn(k))
            for worker in self._workers:
                self._await_ready(worker)
        except BaseException:
            self.close()  # no process and no ring left behind by a failed start
            raise

    # -- submitting and collecting ---------------------------------------------------------

    @property
    def full(self) -> bool:
        return not self._free

    @property
    def pending(self) -> int:
        return len(self._tickets)

    def submit(self, frameset: FrameSet) -> Ticket:
        """Copy the frameset's depth images into the ring and hand them to the workers."""
        if not self._free:
            raise RuntimeError("SegmentationWorkers: no free slot; collect() first")
        present = [(k, frame) for k, cam in enumerate(self._cameras)
                   if (frame := frameset.frames.get(cam)) is not None]
        for _, frame in present:
            self._segmenters[frame.camera_id].check(frame)
        slot = self._free.popleft()
        views = []
        for k, frame in present:
            pool = self._depth_pools.get(frame.camera_id)
            shared = pool.slot_of(frame.depth) if pool is not None else None
            if shared is None:
                np.copyto(self._ring[slot, k], frame.depth)
                self.frames_copied += 1
            else:  # the ticket keeps the frame, and so the slot, until collected
                self.frames_shared += 1
            row = slot if shared is None else self.in_flight + shared
            views.append(View(k, frame.index, frame.timestamp_ms, frame.depth_scale_m, row))
        ticket = Ticket(frameset, slot)
        self._tickets.append(ticket)
        if not views:
            ticket.results = {}
            return ticket
        ticket.job_id = self._next_job
        self._next_job += 1
        self._pending[ticket.job_id] = ticket
        self._send(Job(ticket.job_id, tuple(views)))
        return ticket

    def depth_pool(self, camera_id: str) -> FrameBufferPool | None:
        """Frame slots in the shared file for a camera's depth images: a source that takes
        its depth buffers from here hands them to the workers without a copy."""
        return self._depth_pools.get(camera_id)

    def collect(self, timeout_s: float) -> Ticket | None:
        """The oldest submitted frameset once all its detections are in; None on timeout."""
        if not self._tickets:
            return None
        oldest = self._tickets[0]
        end = time.monotonic() + timeout_s
        while oldest.results is None:
            # Each worker answers in order, and older framesets are collected: the oldest
            # one's job is at the head of its worker's queue.
            holder = next((w for w in self._workers
                           if w.outstanding and w.outstanding[0].job_id == oldest.job_id), None)
            if holder is None:  # would wait for ever: say so instead
                raise RuntimeError(f"item-finding job {oldest.job_id} is neither done nor held "
                                   "by a worker")
            left = end - time.monotonic()
            if left <= 0 or not holder.conn.poll(left):
                return None
            self._receive(holder)
        self._tickets.popleft()
        self._free.append(oldest.slot)
        return oldest

    @staticmethod
    def detections(ticket: Ticket) -> dict[str, list[Detection]]:
        """Detections per camera (each with its frame) of a collected frameset; raises
        `ItemSearchError` when searching it raised."""
        if ticket.error is not None:
            raise ItemSearchError(ticket.error)
        if ticket.results is None:
            raise RuntimeError("detections() of a frameset that was not collected")
        return ticket.results

    # -- metrics ---------------------------------------------------------------------------

    def cpu_s(self) -> float:
        """CPU seconds the workers have spent on jobs, as they last reported."""
        return self._cpu_retired + sum(w.cpu_s for w in self._workers)

    def peak_rss_mb(self) -> float:
        """Sum of the workers' peak resident memory (each one's VmHWM), MB. Conservative: the
        shared libraries in it (~29 MB a worker) are also in the node's own RSS."""
        if self._closed:
            return self._peak_at_close
        return sum(_proc_mb(w.process.pid, "status", ("VmHWM",)) for w in self._workers)

    def private_mb(self) -> float:
        """Sum of the workers' private (unshared) resident memory now, MB: what they add to
        the device's memory on top of the node process."""
        if self._closed:
            return self._private_at_close
        return sum(_proc_mb(w.process.pid, "smaps_rollup", ("Private_Clean", "Private_Dirty"))
                   for w in self._workers)

    def counters(self) -> dict[str, int]:
        return {"workers": len(self._workers), "jobs": self.jobs,
                "respawns": self.respawns, "jobs_done_here": self.jobs_done_here,
                "frames_shared": self.frames_shared, "frames_copied": self.frames_copied,
                "frame_slots_peak": max((p.slots_peak for p in self._depth_pools.values()),
                                        default=0)}

    # -- lifecycle -------------------------------------------------------------------------

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop the workers (pending results are dropped; collect them first)."""
        if self._closed:
            return
        self._peak_at_close = self.peak_rss_mb()
        self._private_at_close = self.private_mb()
        self._closed = True
        for worker in self._workers:
            with contextlib.suppress(OSError, ValueError):
                worker.conn.send(None)
        end = time.monotonic() + timeout_s
        for worker in self._workers:
            _reap(worker, max(0.0, end - time.monotonic()))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._file)
        del self._ring, self._map

    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    # -- internals -------------------------------------------------------------------------

    def _spawn(self, number: int) -> _Worker:
        # A fresh interpreter, not multiprocessing: the node has threads (never fork it), and
        # spawn would re-run whatever script built the node.
        parent, child = socket.socketpair()
        process = subprocess.Popen(
            [sys.executable, "-m", "edge.perception.segmentation_child", str(child.fileno())],
            pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL)
        child.close()
        conn = Connection(parent.detach())
        with contextlib.suppress(OSError):  # died already: _await_ready says so
            conn.send((self._file, self._slot_shape, self._cameras, self._views, self._cfg))
        return _Worker(f"cv-items-{number}", process, conn, deque())

    def _await_ready(self, worker: _Worker, timeout_s: float = 60.0) -> None:
        if not worker.conn.poll(timeout_s):
            raise RuntimeError(f"item-finding worker {worker.name} did not start "
                               f"within {timeout_s:.0f} s")
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            raise RuntimeError(f"item-finding worker {worker.name} exited at start (exit code "
                               f"{worker.process.wait(5.0)}); see its output above") from None
        if isinstance(message, str):
            raise RuntimeError(f"item-finding worker {worker.name} failed: {message}")
        worker.cpu_s = message  # its start-up

    def _send(self, job: Job) -> None:
        if not self._workers:  # every worker died and none could be started again
            self._detect_here(job)
            return
        worker = min(self._workers, key=lambda w: len(w.outstanding))
        worker.outstanding.append(job)
        try:
            worker.conn.send(job)
        except (OSError, ValueError):
            self._replace(worker)

    def _receive(self, worker: _Worker) -> None:
        try:
            job_id, cpu_s, wire = worker.conn.recv()
        except (EOFError, OSError):
            self._replace(worker)
            return
        job = worker.outstanding.popleft()
        if job.job_id != job_id:  # cannot happen with one ordered pipe per worker
            raise RuntimeError(f"item-finding worker answered job {job_id}, expected "
                               f"{job.job_id}")
        worker.cpu_s = cpu_s
        self.jobs += len(job.views)
        ticket = self._pending.pop(job_id)
        if isinstance(wire, str):
            self._failed(ticket, f"item-finding worker {worker.name}: {wire}")
            return
        frames = ticket.frameset.frames
        results = {}
        for cam_index, found in wire:
            cam = self._cameras[cam_index]
            results[cam] = [unwire(w, frames[cam]) for w in found]
        ticket.results = results

    def _replace(self, worker: _Worker) -> None:
        """A worker died: start another and do the jobs it held here, in this thread. If no
        other starts, the pool goes on with one worker less."""
        log.error("item_worker_died", worker=worker.name,
                  exit_code=worker.process.poll(), jobs_lost=len(worker.outstanding))
        _reap(worker, 0.5)
        self._cpu_retired += worker.cpu_s
        index = self._workers.index(worker)
        fresh: _Worker | None = None
        try:
            fresh = self._spawn(index)
            self._await_ready(fresh)
        except (RuntimeError, OSError) as exc:
            if fresh is not None:
                _reap(fresh, 0.5)
            del self._workers[index]
            log.error("item_worker_not_replaced", worker=worker.name, error=str(exc),
                      workers_left=len(self._workers))
        else:
            self._workers[index] = fresh
            self.respawns += 1
        for job in worker.outstanding:
            self._detect_here(job)
        worker.outstanding.clear()

    def _detect_here(self, job: Job) -> None:
        ticket = self._pending.pop(job.job_id)
        frames = ticket.frameset.frames
        cams = [self._cameras[v.camera] for v in job.views]
        try:
            ticket.results = {cam: self._segmenters[cam].detect(frames[cam]) for cam in cams}
        except Exception as exc:  # as from a worker: this frameset, not the pool
            self._failed(ticket, f"item finding in the node: {type(exc).__name__}: {exc}")
        self.jobs_done_here += len(cams)

    def _failed(self, ticket: Ticket, error: str) -> None:
        log.error("item_search_failed", frameset_ms=ticket.frameset.timestamp_ms, error=error)
        ticket.error = error
        ticket.results = {}


class ItemSearchError(RuntimeError):
    """Finding items in one frameset raised (in a worker or in the node)."""


def _proc_mb(pid: int, table: str, keys: tuple[str, ...]) -> float:
    """Sum of `keys` (kB lines) in /proc/PID/TABLE, in MB; 0 for a process that is gone."""
    total = 0
    try:
        for line in Path(f"/proc/{pid}/{table}").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in keys:
                total += int(value.split()[0])
    except OSError:
        return 0.0
    return total / 1024.0


def _reap(worker: _Worker, timeout_s: float) -> None:
    try:
        worker.process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        worker.process.kill()
        worker.process.wait(5.0)
    with contextlib.suppress(OSError):
        worker.conn.close()


def _common_shape(segmenters: Mapping[str, ItemSegmenter]) -> tuple[int, int]:
    shapes = {(s.plane.intrinsics.height, s.plane.intrinsics.width) for s in segmenters.values()}
    if len(shapes) != 1:
        # One ring of equal slots; cameras of different sizes would need one ring each.
        raise ValueError(f"item-finding workers need cameras of one resolution, got "
                         f"{sorted(shapes)}; set items.workers: 0")
    return shapes.pop()


def _ring_file(nbytes: int) -> str:
    for folder in _SHM_DIRS:
        if folder.is_dir() and os.access(folder, os.W_OK):
            _remove_stale_rings(folder)
            fd, name = tempfile.mkstemp(prefix=f"{_RING_PREFIX}{os.getpid()}-", dir=folder)
            os.ftruncate(fd, nbytes)
            os.close(fd)
            return name
    raise RuntimeError("no writable /dev/shm or temp folder for the depth ring")


def _remove_stale_rings(folder: Path) -> None:
    """Rings of nodes that were killed before they could remove theirs."""
    for path in folder.glob(f"{_RING_PREFIX}*"):
        try:
            pid = int(path.name[len(_RING_PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(OSError):
                path.unlink()
                log.info("stale_depth_ring_removed", path=str(path))

