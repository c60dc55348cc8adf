"""`edge-node fleet status`: every node of the site, from their retained status on the broker."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from edge.config import MqttConfig, load_config
from edge.site.fleet import DEFAULT_STALE_AFTER_S, NodeRow, collect_statuses, fleet_rows


def _mqtt(args: argparse.Namespace) -> MqttConfig:
    """The site config's broker settings (TLS, credentials, prefix), `--broker` overriding."""
    mqtt = load_config(args.config).mqtt if args.config is not None else MqttConfig()
    if args.broker is not None:
        mqtt = dataclasses.replace(mqtt, url=args.broker)
    if args.prefix is not None:
        mqtt = dataclasses.replace(mqtt, topic_prefix=args.prefix)
    return mqtt


def _when(ms: float | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000.0, timezone.utc).strftime("%H:%M:%S")


def _line(row: NodeRow) -> str:
    rate = "-" if row.sideline_rate_1h is None else f"{row.sideline_rate_1h:.2%}"
    drift = "-" if row.calibration_drift_mm is None else f"{row.calibration_drift_mm:.1f}"
    cams = ",".join(f"{c}:{s.split(':')[0]}" for c, s in sorted(row.cameras.items())) or "-"
    models = ",".join(f"{k}={v}" for k, v in sorted(row.models.items())) or "-"
    outbox = "-" if row.outbox_depth is None else str(row.outbox_depth)
    return (f"{row.line_id:<10} {row.node_id:<14} {row.state:<7} {row.version or '-':<9} "
            f"{models:<40} {cams:<28} {drift:>6} {outbox:>6} "
            f"{rate:>8} {_when(row.last_verdict_ms):>8} {row.status_age_s:>6.0f}s "
            f"{', '.join(row.flags) or 'ok'}")


def _status(args: argparse.Namespace) -> int:
    try:
        statuses = collect_statuses(_mqtt(args), timeout_s=args.timeout)
    except (ConnectionError, OSError) as exc:
        print(f"edge-node fleet: {exc}", file=sys.stderr)
        return 2
    rows = fleet_rows(statuses, time.time() * 1000.0, args.stale_after)
    if args.json:
        print(json.dumps({"nodes": [r.to_dict() for r in rows],
                          "flagged": sum(1 for r in rows if r.flags)}, indent=2))
    else:
        print(f"{'line':<10} {'node':<14} {'state':<7} {'version':<9} {'models':<40} "
              f"{'cameras':<28} {'drift':>6} {'outbox':>6} {'sideline':>8} {'last':>8} "
              f"{'age':>7} flags")
        for row in rows:
            print(_line(row))
        if not rows:
            print("(no node has published a status under this prefix)")
    # Scripts and monitors act on the exit status: 1 when any node needs a look.
    return 1 if any(r.flags for r in rows) else 0


def add_fleet_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fleet = sub.add_parser("fleet", help="the site's nodes, from their retained status")
    fleet_sub = fleet.add_subparsers(dest="fleet_command", metavar="ACTION", required=True)
    status = fleet_sub.add_parser(
        "status", help="every node: version, models, health, cameras, calibration drift, "
        "outbox, sideline rate over the last hour, last verdict; flags what needs a look "
        "(exit 1 when any node is flagged)")
    status.add_argument("--broker", help="mqtt://HOST:PORT or mqtts://HOST:PORT (default: the "
                        "config's mqtt.url)")
    status.add_argument("--config", type=Path, help="a site node config: its mqtt section "
                        "(TLS, credentials, topic prefix)")
    status.add_argument("--prefix", help="topic prefix (default: the config's, or "
                        "'conveyor-vision')")
    status.add_argument("--stale-after", type=float, default=DEFAULT_STALE_AFTER_S,
                        help=f"seconds after which a status is stale (default "
                        f"{DEFAULT_STALE_AFTER_S:g})")
    status.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the "
                        "broker")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=_status)
