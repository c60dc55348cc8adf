"""Benchmark: verdict decided -> OPC UA data-change notification at a subscribed client, on
loopback, and the CPU the OPC UA server spends per verdict.

Each verdict is decided (timestamped) and handed to the scheduler's sink as in the node
(`Broadcast`: the MQTT publisher and its durable outbox first, then the OPC UA channel); the
latency ends when the node-opcua PLC stand-in (tests/interop/opcua, in its own process, over
SignAndEncrypt unless --security none) gets the data change of `PLC.Seq`. It acknowledges
each result, as a PLC would. The server thread's CPU time is read from its thread clock,
idle (client connected, no verdicts) and during the run. Needs Node.js, `npm ci --omit=dev`
in tests/interop/opcua, and mosquitto. Run:

    .venv/bin/python tools/bench_opcua.py --count 300 --rate 3 --interval 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the node-opcua client harness lives with the interop test

import structlog  # noqa: E402

from edge.clock import WallClock  # noqa: E402
from edge.config import MqttConfig, NodeConfig, OpcUaConfig  # noqa: E402
from edge.pipeline.routing import Broadcast  # noqa: E402
from edge.publish.broker import MosquittoBroker, free_port  # noqa: E402
from edge.publish.mqtt import VerdictPublisher  # noqa: E402
from edge.publish.opcua.channel import OpcUaChannel  # noqa: E402
from edge.publish.opcua.security import Users  # noqa: E402
from edge.types import Decision, Reason, Scores, Verdict  # noqa: E402
from tests.publish.opcua.interop import (  # noqa: E402
    PASSWORD,
    USER,
    JsClient,
    js_client_missing,
    make_pki,
)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class _Timed:
    """The channel, with the time each verdict reached it (after the MQTT outbox)."""

    def __init__(self, channel: OpcUaChannel) -> None:
        self.channel = channel
        self.offered_ms: dict[str, float] = {}
        self.offer_cost_s: list[float] = []

    def offer(self, verdict: Verdict, seq: int) -> None:
        self.offered_ms[verdict.item_id] = time.time() * 1000.0
        t0 = time.perf_counter()
        self.channel.offer(verdict, seq)
        self.offer_cost_s.append(time.perf_counter() - t0)

    def start(self) -> None:
        self.channel.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self.channel.stop(timeout_s)


def _verdict(i: int, deadline_ms: float) -> Verdict:
    now = time.time() * 1000.0
    damaged = i % 7 == 0
    return Verdict(item_id=f"BENCH-{i:05d}", product_id="P-BOX",
                   decision=Decision.SIDELINE if damaged else Decision.PASS,
                   reasons=(Reason.DAMAGE,) if damaged else (),
                   scores=Scores(0.9 if damaged else 0.02, 0.1, 0.0, 0.5), threshold_version="t",
                   model_versions={"damage": "bench"}, findings=(), captured_ms=now - 60.0,
                   decided_ms=now, deadline_ms=now + deadline_ms)


def _server_cpu_s(channel: OpcUaChannel) -> float:
    thread = channel._worker._thread
    assert thread is not None
    assert thread.ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def _channel(tmp: Path, args: argparse.Namespace) -> tuple[OpcUaChannel, Any]:
    pki = make_pki(tmp / "pki")
    secure = args.security != "none"
    cfg = OpcUaConfig(enabled=True, port=free_port(), security=(args.security,),
                      cert_file=pki.server.cert if secure else None,
                      key_file=pki.server.key if secure else None,
                      trusted_dir=pki.server.trusted if secure else None,
                      allow_anonymous=not secure, max_clients=args.churn + 8)
    users = Users({USER: PASSWORD}, "bench") if secure else Users()
    return OpcUaChannel(cfg, NodeConfig(), WallClock(), users=users), pki


def run(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    broker = MosquittoBroker(tmp / "broker")
    broker.start()
    channel, pki = _channel(tmp, args)
    timed = _Timed(channel)
    publisher = VerdictPublisher(MqttConfig(url=broker.url), NodeConfig(), tmp / "outbox.db",
                                 WallClock(), lambda _a: None, lambda _f: None, lambda _a: None)
    sink = Broadcast(publisher, [timed])
    publisher.start()
    timed.start()
    plc = churn = None
    mode = () if args.security != "none" else ("--mode", "None")
    try:
        if not (publisher.wait_connected(10.0) and channel.wait_ready(60.0)):
            raise RuntimeError(f"not up (OPC UA: {channel.failed})")
        plc = JsClient.start(channel.endpoint_url, pki, interval_ms=args.interval, extra=mode)
        if not plc.wait_ready(60.0):
            raise RuntimeError(f"client did not start: {plc.stderr[-5:]}")
        if args.churn:
            churn = JsClient.start(channel.endpoint_url, pki, churn=args.churn, extra=mode,
                                   nice=19)  # other machines: not the CPU the server uses
            if not churn.wait_ready(60.0):
                raise RuntimeError("the churning clients did not start")
        time.sleep(2.0)
        idle0, t_idle = _server_cpu_s(channel), time.monotonic()
        time.sleep(args.idle)
        idle_rate = (_server_cpu_s(channel) - idle0) / (time.monotonic() - t_idle)
        decided: dict[str, float] = {}
        cpu0, t0 = _server_cpu_s(channel), time.monotonic()
        for i in range(args.count):
            verdict = _verdict(i, args.deadline_ms)
            decided[verdict.item_id] = verdict.decided_ms
            sink.publish_verdict(verdict)
            time.sleep(max(0.0, t0 + (i + 1) / args.rate - time.monotonic()))
        time.sleep(1.0)
        cpu, elapsed = _server_cpu_s(channel) - cpu0, time.monotonic() - t0
    finally:
        for js in (churn, plc):
            if js is not None:
                js.stop()
        timed.stop(2.0)
        publisher.stop(flush_timeout_s=2.0)
        broker.close()
    report = _report(args, plc, decided, timed, cpu, elapsed, idle_rate, channel)
    if churn is not None:
        churned = churn.of("churn")
        report["churn"] = {**(churned[-1] if churned else {}),
                           "refused_by_rate": channel.stats.connections_refused}
    return report


def _report(args: argparse.Namespace, plc: JsClient | None, decided: dict[str, float],
            timed: _Timed, cpu: float, elapsed: float, idle_rate: float,
            channel: OpcUaChannel) -> dict[str, Any]:
    assert plc is not None
    seen = {r["item_id"]: float(r["recv_ms"]) for r in plc.of("result")}
    lat = [seen[i] - decided[i] for i in decided if i in seen]
    to_offer = [timed.offered_ms[i] - decided[i] for i in decided]
    after = [seen[i] - timed.offered_ms[i] for i in decided if i in seen]

    def summary(values: list[float]) -> dict[str, float]:
        return {"p50": round(_percentile(values, 50), 1), "p99": round(_percentile(values, 99), 1),
                "max": round(max(values), 1), "mean": round(statistics.fmean(values), 1)}

    return {
        "what": "decided -> data change of PLC.Seq at a node-opcua client, loopback",
        "security": args.security, "publishing_interval_ms": args.interval,
        "deadline_ms": args.deadline_ms, "churning_clients": args.churn,
        "rate_per_s": args.rate, "verdicts": args.count, "notified": len(lat),
        "latency_ms": summary(lat),
        "decided_to_offer_ms (MQTT outbox first)": summary(to_offer),
        "offer_to_notification_ms": summary(after),
        "offer_call_us": {"p50": round(_percentile(timed.offer_cost_s, 50) * 1e6, 1),
                          "max": round(max(timed.offer_cost_s) * 1e6, 1)},
        "server_cpu_ms_per_verdict": round(1000.0 * cpu / args.count, 2),
        "server_cpu_ms_per_verdict_above_idle": round(
            1000.0 * (cpu - idle_rate * elapsed) / args.count, 2),
        "server_cpu_idle_percent": round(100.0 * idle_rate, 2),
        "server_cpu_percent_at_rate": round(100.0 * cpu / elapsed, 2),
        "missed": dict(channel.stats.missed), "dropped": channel.stats.dropped,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--rate", type=float, default=3.0, help="verdicts per second")
    parser.add_argument("--interval", type=int, default=10,
                        help="the client's publishing interval (ms)")
    parser.add_argument("--security", choices=("sign_and_encrypt", "sign", "none"),
                        default="sign_and_encrypt")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds measured idle")
    parser.add_argument("--deadline-ms", type=float, default=3000.0,
                        help="each verdict's divert deadline after its decision (a fail-safe "
                        "one has belt.safety_margin_ms, 400)")
    parser.add_argument("--churn", type=int, default=0,
                        help="more clients connecting and disconnecting meanwhile")
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    args = parser.parse_args()
    missing = js_client_missing()
    if missing is not None:
        print(f"bench_opcua: {missing}", file=sys.stderr)
        return 2
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # warnings
    with tempfile.TemporaryDirectory(prefix="cv-bench-opcua-") as tmp:
        result = run(Path(tmp), args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
