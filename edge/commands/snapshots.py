"""`edge-node snapshots list | export`: the audit snapshots, bundled for people and retraining.

``export --since … --out DIR`` copies every snapshot taken since then into
``DIR/<snapshot id>/`` (sidecar, label, crops, height and mask PNGs, the
pictures) and writes ``DIR/index.jsonl``: one line per item with the
node's decision, the controller's feedback (if any) and the training label
that follows from both:

* ``confirmed_damage`` feedback -> ``damaged``;
* ``false_positive`` and ``packaging_changed`` -> ``intact`` (the latter is
  also a new reference view of the product);
* no feedback -> ``unreviewed`` (the node's own decision is beside it).

Each line also says why the store kept the snapshot (``kept_for``): ``sideline``,
``pass_sample`` (a pass the sample kept: its audit was due) or ``shadow_only`` (a pass or a
sideline kept only because a shadow candidate disagreed: nobody was due to audit it); null
for a passed item's snapshot from before the store recorded it that also holds a shadow
block (either could have kept it).

The export only reads the store, so it is safe while the node runs (a
snapshot evicted during the copy is skipped and counted).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edge.audit.files import read_sidecar
from edge.audit.store import ID_PATTERN
from edge.config import ConfigError, load_config

#: Sub-directory of `storage.state_dir` holding the ring store.
SNAPSHOT_DIR = "snapshots"
TRAINING_LABELS = {"confirmed_damage": "damaged", "false_positive": "intact",
                   "packaging_changed": "intact"}
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now_s: float | None = None) -> float:
    """Seconds since the epoch from ``24h``/``7d``/``30m`` (ago) or an ISO date/time (UTC
    unless it names an offset)."""
    now = time.time() if now_s is None else now_s
    rel = _RELATIVE.match(text.strip())
    if rel:
        return now - float(rel.group(1)) * _UNIT_S[rel.group(2)]
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError("--since", text, "a duration such as 24h, 7d, 30m or an ISO date "
                          "such as 2026-11-23 or 2026-11-23T08:00") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def snapshot_time_s(snapshot_id: str) -> float:
    """When the snapshot's ID was assigned (UTC, from the ID itself)."""
    when = datetime.strptime(snapshot_id[:15], "%Y%m%dT%H%M%S").replace(tzinfo=timezone.utc)
    return when.timestamp() + int(snapshot_id[15:18]) / 1000.0


def stored_snapshots(root: Path, since_s: float = 0.0) -> Iterator[Path]:
    """Snapshot directories in `root` taken at or after `since_s`, oldest first."""
    if not root.is_dir():
        return
    for child in sorted(root.iterdir()):
        if ID_PATTERN.match(child.name) and snapshot_time_s(child.name) >= since_s:
            yield child


def training_label(label: dict[str, Any] | None) -> str:
    if label is None:
        return "unreviewed"
    return TRAINING_LABELS.get(str(label.get("kind")), "unreviewed")


def kept_for(sidecar: dict[str, Any]) -> str | None:
    """Why the store kept a snapshot (its sidecar's ``kept_for``; for older snapshots what
    follows from the decision and the shadow block, None where that cannot tell)."""
    recorded = sidecar.get("kept_for")
    if recorded is not None:
        return str(recorded)
    if sidecar["verdict"]["decision"] == "sideline":
        return "sideline"
    return None if sidecar.get("shadow") is not None else "pass_sample"


def export_snapshots(root: Path, out: Path, since_s: float) -> dict[str, int]:
    """Copy the snapshots since `since_s` into `out` with an ``index.jsonl``; counts by label."""
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {"exported": 0, "vanished": 0}
    with (out / "index.jsonl").open("w", encoding="utf-8") as index:
        for src in stored_snapshots(root, since_s):
            try:
                data = read_sidecar(src)
                shutil.copytree(src, out / src.name, dirs_exist_ok=True)
            except (OSError, ValueError):
                counts["vanished"] += 1  # evicted while we copied it
                shutil.rmtree(out / src.name, ignore_errors=True)
                continue
            v, label = data["verdict"], data["label"]
            truth = (data.get("item") or {}).get("truth")
            line = {
                "snapshot_id": src.name, "item_id": v["item_id"],
                "product_id": v["product_id"], "decision": v["decision"],
                "reasons": v["reasons"], "fused": (v["scores"] or {}).get("fused"),
                "feedback": None if label is None else label.get("kind"),
                "training_label": training_label(label), "kept_for": kept_for(data),
                "truth_damage": None if truth is None else truth.get("damage"),
                "views": {cam: {k: view[k] for k in ("color", "height", "mask")}
                          for cam, view in data["views"].items()},
            }
            index.write(json.dumps(line) + "\n")
            counts["exported"] += 1
            counts[line["training_label"]] = counts.get(line["training_label"], 0) + 1
    return counts


def _store_root(args: argparse.Namespace) -> Path:
    if args.dir is not None:
        return Path(args.dir)
    cfg = load_config(args.config)
    return Path(cfg.storage.state_dir) / SNAPSHOT_DIR


def _export(args: argparse.Namespace) -> int:
    root = _store_root(args)
    since = parse_since(args.since)
    counts = export_snapshots(root, Path(args.out), since)
    sys.stdout.write(json.dumps({
        "store": str(root), "out": str(args.out),
        "since": datetime.fromtimestamp(since, timezone.utc).isoformat(), **counts}) + "\n")
    return 0 if counts["exported"] or not args.require_any else 1


def _list(args: argparse.Namespace) -> int:
    root = _store_root(args)
    since = parse_since(args.since) if args.since else 0.0
    for path in stored_snapshots(root, since):
        try:
            data = read_sidecar(path)
        except (OSError, ValueError):
            continue
        v = data["verdict"]
        label = data["label"]["kind"] if data["label"] else "-"
        sys.stdout.write(f"{path.name}  {v['item_id']:<20} {v['decision']:<8} "
                         f"{','.join(v['reasons']):<20} feedback={label}\n")
    return 0


def add_snapshot_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    snap = sub.add_parser("snapshots", help="audit snapshots: list, export for retraining")
    snap_sub = snap.add_subparsers(dest="snapshots_command", metavar="ACTION", required=True)

    def where(p: argparse.ArgumentParser) -> None:
        g = p.add_mutually_exclusive_group(required=True)
        g.add_argument("--config", type=Path, help="node config YAML (storage.state_dir)")
        g.add_argument("--dir", type=Path, help="the snapshot store directory itself")

    export = snap_sub.add_parser("export", help="bundle snapshots with feedback labels")
    where(export)
    export.add_argument("--since", required=True,
                        help="24h, 7d, 30m (ago) or an ISO date/time (UTC)")
    export.add_argument("--out", type=Path, required=True, help="output directory")
    export.add_argument("--require-any", action="store_true",
                        help="exit 1 when nothing was exported")
    export.set_defaults(handler=_export)

    listing = snap_sub.add_parser("list", help="one line per stored snapshot")
    where(listing)
    listing.add_argument("--since", default=None, help="24h, 7d or an ISO date/time")
    listing.set_defaults(handler=_list)


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - `edge-node` is the entry
    parser = argparse.ArgumentParser(prog="edge-node")
    add_snapshot_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
