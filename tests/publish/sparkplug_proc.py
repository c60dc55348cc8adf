"""A stand-in node process for the Sparkplug B kill test: a channel that runs until killed.

Usage: python sparkplug_proc.py URL STATE_DIR
Prints ``born BDSEQ`` once its NBIRTH is out, then ``seq N`` after each verdict it offers.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import structlog

from edge.clock import WallClock
from edge.config import MqttConfig, NodeConfig, SparkplugConfig
from edge.publish.sparkplug import SparkplugChannel
from tests.publish.helpers import make_verdict


def main() -> None:
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    url, state_dir = sys.argv[1], Path(sys.argv[2])
    channel = SparkplugChannel(SparkplugConfig(enabled=True, group_id="plant-1"),
                               MqttConfig(url=url, keepalive_s=5), NodeConfig(node_id="edge-07"),
                               state_dir, WallClock())
    channel.start()
    end = time.monotonic() + 10.0
    while channel.metrics()["births"] == 0 and time.monotonic() < end:
        time.sleep(0.01)
    print(f"born {channel.bd_seq}", flush=True)
    for i in range(3):
        channel.offer(make_verdict(f"proc-{i}"), i + 1)
        print(f"seq {i + 1}", flush=True)
    time.sleep(3600)  # wait to be killed: never a clean stop


if __name__ == "__main__":
    main()
