"""The fleet view: every node of a site, read from the retained `…/status` messages on the
site's broker, with what an operator must look at flagged.

Each node keeps one retained status (online with versions and health, refreshed every
`STATUS_INTERVAL_S`; offline as its last will), so one subscription to
`{prefix}/+/+/status` returns the whole site at once, nodes that are gone included.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edge.config import MqttConfig
from edge.publish.connection import load_credentials, parse_url, tls_context

#: A status older than this is stale: the node publishes one every 30 s while it runs.
DEFAULT_STALE_AFTER_S = 90.0


@dataclass(frozen=True, slots=True)
class NodeRow:
    """One node as the fleet view shows it."""

    line_id: str
    node_id: str
    state: str  # online | offline
    version: str | None
    models: Mapping[str, str]
    cameras: Mapping[str, str]
    stalled_stages: tuple[str, ...]
    degraded: tuple[str, ...]
    calibration_drift_mm: float | None  # the largest belt drift of its cameras, last check
    outbox_depth: int | None
    sideline_rate_1h: float | None
    last_verdict_ms: float | None
    status_age_s: float
    flags: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"line_id": self.line_id, "node_id": self.node_id, "state": self.state,
                "version": self.version, "models": dict(self.models),
                "cameras": dict(self.cameras), "stalled_stages": list(self.stalled_stages),
                "degraded": list(self.degraded),
                "calibration_drift_mm": self.calibration_drift_mm,
                "outbox_depth": self.outbox_depth, "sideline_rate_1h": self.sideline_rate_1h,
                "last_verdict_ms": self.last_verdict_ms,
                "status_age_s": round(self.status_age_s, 1), "flags": list(self.flags)}


def _drift(calibration: object) -> float | None:
    """The largest |drift| over the cameras' last belt checks (the service's status part)."""
    if not isinstance(calibration, Mapping):
        return None
    drifts = [abs(float(c["drift_mm"])) for c in calibration.values()
              if isinstance(c, Mapping) and isinstance(c.get("drift_mm"), int | float)]
    return max(drifts) if drifts else None


def _models(versions: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in versions.items() if k != "node"}


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def fleet_rows(statuses: Mapping[str, Mapping[str, Any]], now_ms: float,
               stale_after_s: float = DEFAULT_STALE_AFTER_S) -> list[NodeRow]:
    """The rows for every status message (by topic), flagged, sorted by line and node.

    Flags: `offline`, `stale` (no status for `stale_after_s`), `stalled`, `degraded`, and
    `models differ` from what most nodes of the site run (the same product crosses every
    line: a node on other models judges it differently)."""
    majority = Counter(json.dumps(_models(s.get("versions") or {}), sort_keys=True)
                       for s in statuses.values() if s.get("state") == "online")
    usual = majority.most_common(1)[0][0] if len(majority) > 1 else None
    rows = []
    for status in statuses.values():
        health: Mapping[str, Any] = status.get("health") or {}
        versions: Mapping[str, Any] = status.get("versions") or {}
        models = _models(versions)
        age_s = max(0.0, (now_ms - float(status.get("timestamp") or 0)) / 1000.0)
        stalled = tuple(str(s) for s in health.get("stalled_stages") or ())
        degraded = tuple(str(s) for s in health.get("degraded") or ())
        flags = []
        if status.get("state") != "online":
            flags.append("offline")
        elif age_s > stale_after_s:
            flags.append("stale")
        if stalled:
            flags.append("stalled")
        if degraded:
            flags.append("degraded")
        if usual is not None and json.dumps(models, sort_keys=True) != usual and (
                status.get("state") == "online"):
            flags.append("models differ")
        outbox = _number(health.get("outbox_depth"))
        rows.append(NodeRow(
            line_id=str(status.get("line_id")), node_id=str(status.get("node_id")),
            state=str(status.get("state")), version=versions.get("node"), models=models,
            cameras={str(k): str(v) for k, v in (health.get("cameras") or {}).items()},
            stalled_stages=stalled, degraded=degraded,
            calibration_drift_mm=_drift(health.get("calibration")),
            outbox_depth=None if outbox is None else int(outbox),
            sideline_rate_1h=_number(health.get("sideline_rate_1h")),
            last_verdict_ms=_number(health.get("last_verdict_ms")),
            status_age_s=age_s, flags=tuple(flags)))
    return sorted(rows, key=lambda r: (r.line_id, r.node_id))


def collect_statuses(mqtt_cfg: MqttConfig, *, settle_s: float = 0.5,
                     timeout_s: float = 10.0) -> dict[str, dict[str, Any]]:
    """The retained status of every node under `mqtt_cfg.topic_prefix` (by topic), from the
    first broker of `mqtt_cfg.urls` that answers.

    Retained messages arrive right after the subscription; collection ends once `settle_s`
    passes without a new one. Raises `ConnectionError` when no broker can be reached."""
    errors = []
    for url in mqtt_cfg.urls:
        try:
            return _collect(mqtt_cfg, url, settle_s, timeout_s)
        except ConnectionError as exc:
            errors.append(str(exc))
    raise ConnectionError("; ".join(errors))


def _collect(mqtt_cfg: MqttConfig, url: str, settle_s: float,
             timeout_s: float) -> dict[str, dict[str, Any]]:
    addr = parse_url(url)
    credentials = load_credentials(mqtt_cfg)
    got: dict[str, dict[str, Any]] = {}
    last = [time.monotonic()]
    subscribed = threading.Event()
    lock = threading.Lock()
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                         protocol=MQTTProtocolVersion.MQTTv5)
    if addr.tls:
        client.tls_set_context(tls_context(mqtt_cfg.tls))
    if credentials is not None:
        client.username_pw_set(credentials.username, credentials.password)

    def on_message(_c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            return  # not a node's status: skipped
        if isinstance(payload, dict):
            with lock:
                got[msg.topic] = payload
                last[0] = time.monotonic()

    def on_subscribe(*_: object) -> None:
        last[0] = time.monotonic()
        subscribed.set()

    def on_connect(c: paho.Client, *_: object) -> None:
        c.subscribe(f"{mqtt_cfg.topic_prefix.rstrip('/')}/+/+/status", qos=1)

    client.on_message = on_message
    client.on_subscribe = on_subscribe
    client.on_connect = on_connect
    try:
        client.connect(addr.host, addr.port, keepalive=10)
    except OSError as exc:
        raise ConnectionError(f"broker {url}: {exc}") from None
    client.loop_start()
    try:
        end = time.monotonic() + timeout_s
        if not subscribed.wait(timeout_s):
            raise ConnectionError(f"broker {url}: no subscription within {timeout_s} s")
        while time.monotonic() < end and time.monotonic() - last[0] < settle_s:
            time.sleep(0.05)
    finally:
        client.disconnect()
        client.loop_stop()
    with lock:
        return dict(got)
