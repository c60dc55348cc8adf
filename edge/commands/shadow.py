"""`edge-node shadow report`: what the candidate models did differently, and who was right.

Every shadow disagreement is an audit snapshot whose sidecar holds production's verdict and
the candidate's (`edge.pipeline.shadow`). The report counts them since a time, per candidate
and direction, with the controller's feedback where it came:

| direction | feedback `confirmed_damage` | `false_positive`, `packaging_changed` |
| --- | --- | --- |
| `candidate_sidelines` (production passed) | the candidate was right | production was right |
| `candidate_passes` (production sidelined) | production was right | the candidate was right |

With the node's config it also shows the shadow record (`state_dir/shadow/record.json`):
items scored, failed and skipped, agreement and both sideline rates.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edge.audit.files import read_sidecar
from edge.audit.shadow_record import SHADOW_RECORD_FILE, ShadowRecord, load_shadow_record
from edge.commands.snapshots import SNAPSHOT_DIR, parse_since, stored_snapshots
from edge.config import ConfigError, load_config
from edge.pipeline.shadow import CANDIDATE_PASSES, CANDIDATE_SIDELINES

DIRECTIONS = (CANDIDATE_SIDELINES, CANDIDATE_PASSES)
#: Who was right, by direction and the controller's feedback.
RIGHT = {(CANDIDATE_SIDELINES, "confirmed_damage"): "candidate",
         (CANDIDATE_SIDELINES, "false_positive"): "production",
         (CANDIDATE_SIDELINES, "packaging_changed"): "production",
         (CANDIDATE_PASSES, "confirmed_damage"): "production",
         (CANDIDATE_PASSES, "false_positive"): "candidate",
         (CANDIDATE_PASSES, "packaging_changed"): "candidate"}


def _direction_counts() -> dict[str, Any]:
    return {"items": 0, "feedback": {}, "candidate_right": 0, "production_right": 0,
            "unreviewed": 0}


def shadow_report(sidecars: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Disagreements per candidate (in the order first met), by direction and feedback."""
    candidates: dict[str, dict[str, Any]] = {}
    for data in sidecars:
        shadow = data.get("shadow")
        if not isinstance(shadow, dict) or shadow.get("disagreement") not in DIRECTIONS:
            continue
        manifest = shadow.get("candidate_manifest") or {}
        sha = str(manifest.get("sha256"))
        entry = candidates.setdefault(sha, {
            "version": manifest.get("version"), "sha256": sha, "disagreements": 0,
            "candidate_right": 0, "production_right": 0, "unreviewed": 0,
            "by_direction": {d: _direction_counts() for d in DIRECTIONS}})
        direction = shadow["disagreement"]
        label = data.get("label")
        kind = None if not isinstance(label, dict) else label.get("kind")
        right = RIGHT.get((direction, str(kind))) if kind is not None else None
        counts = entry["by_direction"][direction]
        entry["disagreements"] += 1
        counts["items"] += 1
        if kind is not None:
            counts["feedback"][kind] = counts["feedback"].get(kind, 0) + 1
        key = "unreviewed" if right is None else f"{right}_right"
        counts[key] += 1
        entry[key] += 1
    return list(candidates.values())


def _sidecars(root: Path, since_s: float) -> Iterable[dict[str, Any]]:
    for path in stored_snapshots(root, since_s):
        try:
            yield read_sidecar(path)
        except (OSError, ValueError):
            continue  # evicted while we read


def _record_json(record: ShadowRecord | None) -> dict[str, Any] | None:
    if record is None:
        return None
    return {"candidate_version": record.candidate_version,
            "candidate_sha256": record.candidate_sha256, "items_scored": record.items_scored,
            "items_failed": record.items_failed, "items_skipped": record.items_skipped,
            "agreement": record.agreement,
            "sideline_rate_production": record.sideline_rate_production,
            "sideline_rate_candidate": record.sideline_rate_candidate,
            "updated_ms": record.updated_ms}


def _print(report: Mapping[str, Any]) -> None:
    out = sys.stdout
    out.write(f"shadow disagreements since {report['since']} in {report['store']}: "
              f"{sum(c['disagreements'] for c in report['candidates'])}\n")
    for c in report["candidates"]:
        out.write(f"candidate {c['version']} (sha256 {c['sha256'][:12]}): {c['disagreements']}"
                  f" disagreements; right: candidate {c['candidate_right']}, production "
                  f"{c['production_right']}, unreviewed {c['unreviewed']}\n")
        for direction, d in c["by_direction"].items():
            feedback = ", ".join(f"{k} {n}" for k, n in sorted(d["feedback"].items())) or "-"
            out.write(f"  {direction:<20} {d['items']:>5}   feedback: {feedback}\n")
    rec = report["record"]
    if rec is not None:
        out.write(f"shadow record: candidate {rec['candidate_version']} "
                  f"(sha256 {rec['candidate_sha256'][:12]}), {rec['items_scored']} scored, "
                  f"{rec['items_failed']} failed, {rec['items_skipped']} skipped, agreement "
                  f"{rec['agreement']:.1%}, sideline "
                  f"rate production {rec['sideline_rate_production']:.2%}, candidate "
                  f"{rec['sideline_rate_candidate']:.2%}\n")


def _report(args: argparse.Namespace) -> int:
    since = parse_since(args.since)
    record = None
    if args.dir is not None:
        root = Path(args.dir)
        if not root.is_dir():
            raise ConfigError("--dir", str(root), "a snapshot store or export folder")
    else:
        state = Path(load_config(args.config).storage.state_dir)
        root = state / SNAPSHOT_DIR
        record = load_shadow_record(state / SHADOW_RECORD_FILE)
    report = {"since": datetime.fromtimestamp(since, timezone.utc).isoformat(),
              "store": str(root), "candidates": shadow_report(_sidecars(root, since)),
              "record": _record_json(record)}
    if args.json:
        sys.stdout.write(json.dumps(report) + "\n")
    else:
        _print(report)
    return 0


def add_shadow_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    shadow = sub.add_parser("shadow", help="shadow scoring: what the candidate models did")
    shadow_sub = shadow.add_subparsers(dest="shadow_command", metavar="ACTION", required=True)
    report = shadow_sub.add_parser(
        "report", help="disagreements with production, by direction, and who was right")
    report.add_argument("--since", required=True,
                        help="24h, 7d, 30m (ago) or an ISO date/time (UTC)")
    where = report.add_mutually_exclusive_group()
    where.add_argument("--config", type=Path, default=None,
                       help="node config YAML: its snapshot store and shadow record (default: "
                       "the embedded defaults)")
    where.add_argument("--dir", type=Path, default=None,
                       help="a snapshot store or export folder itself (no shadow record)")
    report.add_argument("--json", action="store_true", help="one JSON document")
    report.set_defaults(handler=_report)
