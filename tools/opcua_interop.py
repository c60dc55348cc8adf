"""OPC UA interop at length (outside CI): a node on the synthetic belt serves about `--items`
items over SignAndEncrypt to the node-opcua PLC stand-in (tests/interop/opcua), while
`--churn` more node-opcua clients (at nice 19: they stand for other machines) connect,
subscribe and disconnect in a loop (connected 2-8 s, away 1-4 s). Passes when
every announced item reached the PLC exactly once, acknowledged, with its MQTT decision and
Seq, and no result was missed or dropped. Needs Node.js, `npm ci --omit=dev` in
tests/interop/opcua, and mosquitto. A few minutes:

    .venv/bin/python tools/opcua_interop.py --items 200 --churn 50 --json /tmp/interop.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the harness lives with the interop test

import structlog  # noqa: E402

from edge.app.build import build_node  # noqa: E402
from edge.clock import WallClock  # noqa: E402
from edge.publish.broker import MosquittoBroker, free_port  # noqa: E402
from edge.publish.opcua.channel import OpcUaChannel  # noqa: E402
from edge.publish.topics import Topics  # noqa: E402
from edge.sim.controller import ControllerSimulator  # noqa: E402
from tests.publish.opcua.interop import (  # noqa: E402
    JsClient,
    Pki,
    WithPhantoms,
    js_client_missing,
    make_pki,
    node_config,
    wait_for,
)

#: The belt starts this long after the node: the server and the PLC are up by then.
START_AFTER_MS = 8000.0


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run(tmp: Path, broker: MosquittoBroker, pki: Pki, args: argparse.Namespace
        ) -> dict[str, Any]:
    cfg = node_config(tmp, broker.url, free_port(), pki, items_per_second=args.rate,
                      seed=args.seed, max_clients=args.churn + 8)
    clock = WallClock()
    built = build_node(cfg, clock, belt_start_delay_ms=START_AFTER_MS)
    node, world = built.node, built.world
    assert world is not None
    channel = next(c for c in node.channels if isinstance(c, OpcUaChannel))
    announcements = WithPhantoms(world, every_ms=5000.0, until_ms=float("inf"))
    controller = ControllerSimulator(
        broker.url, Topics(cfg.mqtt.topic_prefix, cfg.node.line_id, cfg.node.node_id),
        clock, announcements)
    plc = churn = None
    world.start_ms = clock.now_ms() + START_AFTER_MS
    node.start()
    try:
        if not (node.publisher.wait_connected(10.0) and channel.wait_ready(60.0)):
            raise RuntimeError(f"node not up (OPC UA: {channel.failed})")
        plc = JsClient.start(channel.endpoint_url, pki)
        # The churning clients stand for other machines: at nice 19 they take no CPU the node
        # needs (on a 2-core box, about 0.75 of a core otherwise).
        churn = (JsClient.start(channel.endpoint_url, pki, churn=args.churn, nice=19)
                 if args.churn else None)
        if not plc.wait_ready(60.0) or (churn is not None and not churn.wait_ready(60.0)):
            raise RuntimeError("the node-opcua clients did not start")
        controller.start()
        print(f"belt running until {args.items} items are announced, {args.churn} clients "
              "churning", file=sys.stderr)
        wait_for(lambda: len(controller.announced) >= args.items,
                 2.0 * args.items / args.rate + 60.0 + START_AFTER_MS / 1000.0, step_s=0.05)
        # No more items onto the belt (nor phantoms): the ones on it go on to the divert.
        world.induct_cutoff_ms = announcements.until_ms = clock.now_ms() - world.start_ms
        wait_for(lambda: node.scheduler.in_flight == 0, 30.0)
        announced = set(controller.announced)
        wait_for(lambda: announced <= {r["item_id"] for r in plc.of("result")}, 15.0)
        clients_seen = channel.stats.clients
    finally:
        for js in (churn, plc):
            if js is not None:
                js.stop()
        node.stop()
        controller.stop()
        node.inspector.close()
    return _report(announced, plc, churn, controller, channel, announcements, clients_seen)


def _report(announced: set[str], plc: JsClient, churn: JsClient | None,
            controller: ControllerSimulator, channel: OpcUaChannel,
            announcements: WithPhantoms, clients_seen: int) -> dict[str, Any]:
    results = [r for r in plc.of("result") if r["item_id"] in announced]
    counts = Counter(r["item_id"] for r in results)
    by_seq = {int(str(v["seq"])): v for v in controller.received.by_key.values()}
    latency = []
    mismatched = 0
    decisions = {"pass": 0, "sideline": 1}
    for r in results:
        mqtt = by_seq.get(r["seq"])
        if mqtt is None or decisions[str(mqtt["decision"])] != r["decision"] or (
                mqtt["item_id"] != r["item_id"]):
            mismatched += 1
            continue
        stamps = mqtt["timestamps"]
        assert isinstance(stamps, dict)
        latency.append(r["recv_ms"] - float(stamps["decided"]))
    churned = churn.of("churn") if churn is not None else []
    stats = channel.stats
    return {
        "items_announced": len(announced),
        "phantoms (fail-safe by design)": len(announcements.phantoms),
        "results_at_plc": len(results),
        "items_missing_at_plc": len(announced - set(counts)),
        "items_more_than_once": sum(1 for n in counts.values() if n > 1),
        "fail_safe_results": sum(1 for r in results if r["fail_safe"]),
        "acks_not_good": sum(1 for r in results if r["ack"] != "Good"),
        "mismatched_with_mqtt": mismatched,
        "decided_to_plc_ms": {"p50": _percentile(latency, 50), "p99": _percentile(latency, 99),
                              "max": max(latency, default=None)},
        "server": {"results": stats.results, "acked": stats.acked, "missed": stats.missed,
                   "dropped": stats.dropped, "logins_refused": stats.logins_refused,
                   "connections_refused_by_rate": stats.connections_refused,
                   "clients_at_end_of_run": clients_seen},
        "churn": churned[-1] if churned else None,
        "plc_errors": plc.of("error")[:5],
    }


def passed(report: dict[str, Any]) -> bool:
    return bool(report["items_missing_at_plc"] == 0 and report["items_more_than_once"] == 0
            and report["acks_not_good"] == 0 and report["mismatched_with_mqtt"] == 0
            and report["server"]["dropped"] == 0
            and sum(report["server"]["missed"].values()) == 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200, help="items to announce (about)")
    parser.add_argument("--rate", type=float, default=3.0, help="items per second")
    parser.add_argument("--churn", type=int, default=50,
                        help="clients connecting and disconnecting during the run")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args()
    missing = js_client_missing()
    if missing is not None:
        print(f"opcua_interop: {missing}", file=sys.stderr)
        return 2
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # warnings
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cv-opcua-interop-") as tmp_name:
        tmp = Path(tmp_name)
        broker = MosquittoBroker(tmp / "broker")
        broker.start()
        try:
            report = run(tmp, broker, make_pki(tmp / "pki"), args)
        finally:
            broker.close()
    report["wall_s"] = round(time.monotonic() - started, 1)
    report["passed"] = passed(report)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
