"""Pipeline stages: offline capture kept abreast (`ReplayLockstep`), the item stage and the
inference stage at shutdown and reload."""

from __future__ import annotations

import threading
import time

import numpy as np

from edge.capture.source import EndOfStream, SourceCounters
from edge.clock import ManualClock
from edge.perception.segmentation_workers import ItemSearchError, Ticket
from edge.pipeline.stage_thread import BoundedQueue
from edge.pipeline.stages import CaptureStage, InferenceStage, ItemStage, ReplayLockstep
from edge.types import Frame, FrameSet, Intrinsics, ItemRecord

INTR = Intrinsics(8, 6, 10.0, 10.0, 4.0, 3.0)


class ListSource:
    """A finite camera that takes `delay_s` per frame, like a slow reader."""

    def __init__(self, camera_id: str, count: int, fps: float, delay_s: float = 0.0) -> None:
        self._id = camera_id
        self._frames = [Frame(camera_id, i, 1e12 + i * 1000.0 / fps,
                              np.zeros((6, 8, 3), np.uint8), np.zeros((6, 8), np.uint16),
                              0.001, INTR) for i in range(count)]
        self._delay = delay_s
        self._counters = SourceCounters()

    @property
    def camera_id(self) -> str:
        return self._id

    @property
    def counters(self) -> SourceCounters:
        return self._counters

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def read(self, timeout_s: float) -> Frame | None:
        if not self._frames:
            raise EndOfStream(f"{self._id}: end of recording")
        time.sleep(self._delay)
        return self._frames.pop(0)


def _run(stage: CaptureStage) -> None:
    while not stage.finished.is_set():
        stage.step()


def replay(sources: list[ListSource], fps: dict[str, float], *, lockstep: bool = True
           ) -> tuple[list[str], ReplayLockstep]:
    """Play `sources` through offline capture stages into one small queue (as the node does);
    returns the order in which the frames were handed on."""
    pace = ReplayLockstep(fps)
    out: BoundedQueue[Frame] = BoundedQueue("frames", 2 * len(sources))
    stop = threading.Event()
    stages = [CaptureStage(s, out, stop, offline=True, lockstep=pace if lockstep else None)
              for s in sources]
    threads = [threading.Thread(target=_run, args=(st,)) for st in stages]
    for t in threads:
        t.start()
    order: list[str] = []
    while any(t.is_alive() for t in threads) or out.depth():
        frame = out.get(0.01)
        if frame is not None:
            order.append(frame.camera_id)
    stop.set()
    return order, pace


def _max_lead(order: list[str], fps: dict[str, float]) -> float:
    """The most seconds of recording one camera was ever ahead of the other."""
    played = dict.fromkeys(fps, 0)
    worst = 0.0
    for cam in order:
        played[cam] += 1
        t = [played[c] / fps[c] for c in fps]
        worst = max(worst, max(t) - min(t))
    return worst


def test_a_fast_recording_waits_for_a_slow_one_and_nothing_is_lost() -> None:
    """A recording read instantly stays within a few frames of one that takes 3 ms a frame;
    without the lockstep it runs far ahead (what made the sync hold dozens of frames)."""
    fps = {"fast": 15.0, "slow": 15.0}
    order, pace = replay([ListSource("fast", 60, 15.0), ListSource("slow", 60, 15.0, 0.003)],
                         fps)
    assert sorted(order) == ["fast"] * 60 + ["slow"] * 60
    assert _max_lead(order, fps) <= 3 / 15.0 + 1e-9  # the 2-frame lead plus the frame in hand
    assert pace.waits > 0
    free, _ = replay([ListSource("fast", 60, 15.0), ListSource("slow", 60, 15.0, 0.003)], fps,
                     lockstep=False)
    assert _max_lead(free, fps) > 10 / 15.0


def test_cameras_at_different_rates_stay_abreast_in_recording_time() -> None:
    """Pacing is by seconds of recording played: a 30 fps camera hands on two frames for each
    of a 15 fps camera's."""
    fps = {"a": 30.0, "b": 15.0}
    order, _ = replay([ListSource("a", 60, 30.0), ListSource("b", 30, 15.0, 0.003)], fps)
    assert (order.count("a"), order.count("b")) == (60, 30)
    assert _max_lead(order, fps) <= 3 / 15.0 + 1e-9


def test_the_others_go_on_when_a_recording_ends() -> None:
    """A camera whose recording ends is retired: nobody waits for it."""
    fps = {"short": 15.0, "long": 15.0}
    order, _ = replay([ListSource("short", 3, 15.0), ListSource("long", 40, 15.0)], fps)
    assert (order.count("short"), order.count("long")) == (3, 40)


def test_a_camera_waiting_for_its_turn_is_released_by_stop() -> None:
    """A stopping node never hangs on a camera that is ahead: `wait_turn` returns False."""
    pace = ReplayLockstep({"a": 15.0, "b": 15.0})
    for _ in range(5):
        pace.played("a")
    stop = threading.Event()
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(pace.wait_turn("a", stop)))
    waiter.start()
    time.sleep(0.1)
    assert waiter.is_alive()  # "a" is 5 frames ahead of "b"
    stop.set()
    waiter.join(1.0)
    assert got == [False]
    assert pace.wait_turn("b", stop)  # the one behind never waits


def _record(item_id: str) -> ItemRecord:
    return ItemRecord(track_id=1, item_id=item_id, product_id=None, first_seen_ms=0.0,
                      captured_ms=0.0, deadline_ms=1.0, box_mm=(1.0, 1.0, 1.0),
                      centre_mm=(0.0, 0.0), crops={})


class OneItemPerFrameset:
    """A tracker that completes one item per frameset."""

    def __init__(self) -> None:
        self.n = 0

    def process(self, frameset: FrameSet, found: object = None) -> list[ItemRecord]:
        self.n += 1
        return [_record(f"item-{self.n}")]

    def flush(self) -> list[ItemRecord]:
        return []


def test_an_item_the_full_queue_refused_at_shutdown_is_handed_on_by_finish() -> None:
    """The stop comes while the item stage waits for room for a record: the record is not
    lost (the tracker will not emit it again), `finish` returns it for inspection."""
    inbox: BoundedQueue[FrameSet] = BoundedQueue("framesets", 4)
    out: BoundedQueue[ItemRecord] = BoundedQueue("items", 1)
    stop = threading.Event()
    stage = ItemStage(OneItemPerFrameset(), inbox, out, stop)
    assert out.put(_record("queued"), stop)  # the inference queue is full
    inbox.put_nowait_or_drop(FrameSet(1e12, {}))
    threading.Timer(0.2, stop.set).start()
    stage.step()  # blocks on the full queue until the stop
    assert out.depth() == 1
    assert [r.item_id for r in stage.finish()] == ["item-1"]


class _NamedPolicy:
    """A verdict policy whose every "verdict" is its own name: which policy decided."""

    def __init__(self, name: str) -> None:
        self.name = name

    def decide(self, record: ItemRecord, inference: object, now_ms: float) -> str:
        return self.name


def test_a_reload_switches_between_batches_never_inside_one() -> None:
    """A batch is being inferred when SIGHUP comes: the reload waits for it, so its items are
    decided with the thresholds that go with the models that scored them."""
    started, release = threading.Event(), threading.Event()

    def infer(batch: object) -> list[None]:
        started.set()
        release.wait(5.0)
        return [None]

    decided: list[object] = []
    inbox: BoundedQueue[ItemRecord] = BoundedQueue("items", 4)
    stage = InferenceStage(infer, _NamedPolicy("old"),  # type: ignore[arg-type]
                           lambda d: decided.append(d.verdict), inbox, ManualClock(0.0), 4)
    inbox.put_nowait_or_drop(_record("a"))
    batch = threading.Thread(target=stage.step)
    batch.start()
    assert started.wait(5.0)

    def reload() -> None:
        with stage.batch_lock:
            stage.policy = _NamedPolicy("new")  # type: ignore[assignment]

    reloading = threading.Thread(target=reload)
    reloading.start()
    time.sleep(0.2)
    assert reloading.is_alive()  # waits for the batch in progress
    release.set()
    batch.join(5.0)
    reloading.join(5.0)
    assert decided == ["old"]
    assert stage.policy.name == "new"  # type: ignore[attr-defined]


class _OneBadFrameset:
    """A worker pool whose first frameset's search failed and second one found nothing."""

    full = True

    def __init__(self) -> None:
        self.tickets = [Ticket(FrameSet(1.0, {}), 0), Ticket(FrameSet(2.0, {}), 1)]

    @property
    def pending(self) -> int:
        return len(self.tickets)

    def collect(self, timeout_s: float) -> Ticket:
        return self.tickets.pop(0)

    def detections(self, ticket: Ticket) -> dict[str, list[object]]:
        if ticket.frameset.timestamp_ms == 1.0:
            raise ItemSearchError("item-finding worker cv-items-0: ValueError: bad frame")
        return {}


def test_a_frameset_whose_search_failed_is_skipped_and_the_next_one_tracked() -> None:
    """The failed frameset costs only itself: no exception out of the stage's step (which
    would count as a stage error, log twice and pause the stage)."""
    tracker = OneItemPerFrameset()
    out: BoundedQueue[ItemRecord] = BoundedQueue("items", 4)
    stage = ItemStage(tracker, BoundedQueue("framesets", 4), out, threading.Event(),
                      workers=_OneBadFrameset())  # type: ignore[arg-type]
    stage.step()
    assert tracker.n == 0
    stage.step()
    assert tracker.n == 1
    assert out.depth() == 1
