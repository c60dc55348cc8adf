"""A stand-in node process for the kill test: publishes verdicts until killed.

Usage: python node_proc.py URL OUTBOX COUNT PACE_MS
Prints ``seq N`` after each verdict is in the outbox (and handed to MQTT).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import structlog

from edge.clock import WallClock
from edge.config import MqttConfig, NodeConfig
from edge.publish.mqtt import VerdictPublisher
from tests.publish.helpers import make_verdict


def main() -> None:
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    url, outbox, count, pace_ms = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), \
        float(sys.argv[4])
    pub = VerdictPublisher(MqttConfig(url=url, keepalive_s=5), NodeConfig(), outbox,
                           WallClock(), lambda _a: None, lambda _f: None)
    pub.start()
    pub.wait_connected(5)
    for i in range(count):
        seq = pub.publish_verdict(make_verdict(f"proc-{i}"))
        print(f"seq {seq}", flush=True)
        time.sleep(pace_ms / 1000.0)
    print("done", flush=True)
    time.sleep(3600)  # wait to be killed: never a clean stop


if __name__ == "__main__":
    main()
