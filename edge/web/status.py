"""The live page's JSON: what the node is doing, read at request time."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from edge import __version__
from edge.pipeline.node import Node, stage_timings
from edge.web.live import LiveFeed

#: Recent verdicts (any decision) listed on the page.
RECENT_VERDICTS = 20


def clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become None, tuples lists, keys strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def calibration_status(node: Node, results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per camera: its source, when it was calibrated, and the last belt check (ok is None
    until a check has run)."""
    sources = {c.id: c.source for c in node.cfg.cameras}
    out: dict[str, dict[str, Any]] = {}
    for cam in node.cameras.sources:
        cal = node.cameras.calibrations.get(cam)
        check = results.get(cam)
        out[cam] = {
            "source": sources.get(cam, "?"),
            "calibrated": cal is not None,
            "calibrated_at": None if cal is None else cal.calibrated_at,
            "serial": None if cal is None else cal.serial,
            "check": dict(check) if isinstance(check, Mapping) else None,
            "ok": bool(check.get("passed")) if isinstance(check, Mapping) else None,
        }
    return out


def _sidelined(node: Node, n: int) -> list[dict[str, Any]]:
    store = node.snapshots
    if store is None:
        return []
    out = []
    for data in store.recent(n, decision="sideline"):
        sid = data["snapshot_id"]
        v = data["verdict"]
        out.append({
            "snapshot_id": sid, "item_id": v["item_id"], "product_id": v["product_id"],
            "reasons": v["reasons"], "fused": (v["scores"] or {}).get("fused"),
            "decided_ms": v["decided_ms"], "fail_safe": v["fail_safe"],
            "findings": v["findings"], "label": data.get("label"),
            "sheet": f"/snapshots/{sid}/{data['sheet']}",
            "overlays": {cam: f"/snapshots/{sid}/{view['overlay']}"
                         for cam, view in data["views"].items()},
        })
    return out


def page_status(node: Node, live: LiveFeed | None,
                calibration: Callable[[], Mapping[str, Any]] | None, n: int) -> dict[str, Any]:
    snap = node.snapshot()
    store = node.snapshots
    body: dict[str, Any] = clean({
        "node": {"node_id": node.cfg.node.node_id, "line_id": node.cfg.node.line_id,
                 "version": __version__, "models": dict(node.inspector.model_versions())},
        "summary": node.summary_line(),
        "health": node.health(),
        "stage_ms": dict(stage_timings(node)),
        "queues": dict(snap.queue_depth),
        "items": dict(snap.items),
        "verdicts": dict(snap.verdicts_by_decision),
        "cameras": [{"id": cam, "fps": round(s.fps, 1), "frames": s.frames,
                     "dropped": s.dropped} for cam, s in snap.cameras.items()],
        "framesets_seen": live.framesets_seen() if live is not None else 0,
        "live_view": live is not None,
        "calibration": calibration_status(node, calibration() if calibration else {}),
        "recent": [i.as_json() for i in live.recent(RECENT_VERDICTS)] if live else [],
        "sidelined": _sidelined(node, n),
        "snapshots": None if store is None else {
            "stored": len(store.ids()), "bytes": store.total_bytes,
            "max_bytes": store.max_bytes, "saved": store.stats.saved,
            "lost": store.stats.dropped_queue_full + store.stats.skipped_disk_full
            + store.stats.write_errors},
    })
    return body
