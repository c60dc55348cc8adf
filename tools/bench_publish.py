"""Benchmark: verdict decided -> PUBACK latency on loopback (embedded mosquitto).

Each verdict is decided (timestamped) and immediately handed to the publisher,
which writes it to the durable outbox (SQLite WAL, synchronous=FULL) and
publishes it at QoS 1; the latency ends when the broker's PUBACK reaches the
node's ack thread. Run:

    /work/venv/bin/python tools/bench_publish.py --count 2000 --rate 200
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import structlog

from edge.clock import WallClock
from edge.config import MqttConfig, NodeConfig
from edge.publish.broker import MosquittoBroker
from edge.publish.mqtt import AckedVerdict, VerdictPublisher
from edge.types import Decision, Reason, Scores, Verdict


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=200.0, help="verdicts per second")
    parser.add_argument("--outbox-dir", type=Path, default=None,
                        help="directory for the outbox (default: a temp dir)")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))

    clock = WallClock()
    acked: list[AckedVerdict] = []
    done = threading.Event()

    def on_acked(a: AckedVerdict) -> None:
        acked.append(a)
        if len(acked) >= args.count:
            done.set()

    with tempfile.TemporaryDirectory() as tmp, MosquittoBroker(Path(tmp) / "broker") as broker:
        outbox = (args.outbox_dir or Path(tmp)) / "bench-outbox.db"
        pub = VerdictPublisher(MqttConfig(url=broker.url), NodeConfig(), outbox, clock,
                               lambda _a: None, lambda _f: None, on_acked)
        pub.start()
        assert pub.wait_connected(5), pub.last_error
        append_ms: list[float] = []
        period = 1.0 / args.rate
        next_t = time.monotonic()
        for i in range(args.count):
            now = clock.now_ms()
            verdict = Verdict(f"bench-{i}", "box-small", Decision.PASS, (Reason.DAMAGE,),
                              Scores(0.1, 0.2, 0.0, 0.1, {"crush": 0.1}), "thr-1",
                              {"damage": "v1"}, (), now - 30.0, now, now + 2500.0)
            t0 = time.perf_counter()
            pub.publish_verdict(verdict)
            append_ms.append((time.perf_counter() - t0) * 1000.0)
            next_t += period
            time.sleep(max(0.0, next_t - time.monotonic()))
        done.wait(30)
        pub.stop(5)
    lat = [a.acked_ms - a.decided_ms for a in acked]
    print(f"verdicts: {args.count} at {args.rate:g}/s, acked: {len(acked)}")
    print(f"decided -> PUBACK ms: p50 {statistics.median(lat):.2f}  "
          f"p99 {_percentile(lat, 99):.2f}  max {max(lat):.2f}")
    print(f"publish_verdict() call ms (outbox write + hand-off): "
          f"p50 {statistics.median(append_ms):.2f}  p99 {_percentile(append_ms, 99):.2f}")


if __name__ == "__main__":
    main()
