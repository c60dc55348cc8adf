"""What the node's Sparkplug B messages carry: metric names and types, births, data, deaths.

The protobuf encoding and the topic names are pysparkplug's; this module only decides the
metrics. Names are `/`-separated folders, as SCADA hosts show them (Ignition's MQTT Engine
makes a tag folder of each). No aliases: every metric is sent by name, so that a host that
missed a birth still reads the data. `docs/sparkplug.md` lists every metric.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterable, Mapping
from pathlib import Path

import structlog

from edge.durable import write_atomic
from edge.types import Verdict

try:
    import pysparkplug as spb
except ModuleNotFoundError as exc:  # not in the project's dependencies: see docs/sparkplug.md
    raise ModuleNotFoundError(
        "sparkplug.enabled needs pysparkplug, installed without its dependencies (it pins "
        "paho-mqtt<2 for a client the node does not use): "
        "pip install --no-deps 'pysparkplug==0.6.*'") from exc

log = structlog.get_logger(__name__)

T = spb.DataType
MessageType = spb.MessageType
#: A metric's type and value (None: null).
Value = tuple[spb.DataType, "spb.MetricValue | None"]

BDSEQ = "bdSeq"
REBIRTH = "Node Control/Rebirth"
#: seq and bdSeq both count 0..255 and wrap (Sparkplug B 3.0).
SEQ_MODULO = 256

#: The verdict metrics: sent in NDATA, one NDATA per verdict; declared (null) in NBIRTH.
VERDICT_METRICS: dict[str, spb.DataType] = {
    "Verdict/seq": T.UINT64,
    "Verdict/item_id": T.STRING,
    "Verdict/product_id": T.STRING,
    "Verdict/decision": T.STRING,
    "Verdict/sideline": T.BOOLEAN,
    "Verdict/reasons": T.STRING,
    "Verdict/fail_safe": T.BOOLEAN,
    "Verdict/late": T.BOOLEAN,
    "Verdict/scores/fused": T.DOUBLE,
    "Verdict/scores/damage": T.DOUBLE,
    "Verdict/scores/anomaly": T.DOUBLE,
    "Verdict/scores/geometry": T.DOUBLE,
    "Verdict/threshold_version": T.STRING,
    "Verdict/decided": T.DATETIME,
    "Verdict/deadline": T.DATETIME,
}


def _datetime(ms: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000.0, tz=dt.timezone.utc)


def verdict_values(verdict: Verdict, seq: int) -> dict[str, Value]:
    """The verdict as metrics; `seq` is the MQTT outbox's number of the same verdict."""
    scores = verdict.scores
    values: dict[str, spb.MetricValue | None] = {
        "Verdict/seq": seq,
        "Verdict/item_id": verdict.item_id,
        "Verdict/product_id": verdict.product_id,
        "Verdict/decision": verdict.decision.value,
        "Verdict/sideline": verdict.decision.value == "sideline",
        "Verdict/reasons": ",".join(r.value for r in verdict.reasons),
        "Verdict/fail_safe": verdict.fail_safe,
        "Verdict/late": verdict.late,
        # A fail-safe verdict has no scores: null, never a made-up 0.
        "Verdict/scores/fused": scores.fused if scores else None,
        "Verdict/scores/damage": scores.damage if scores else None,
        "Verdict/scores/anomaly": scores.anomaly if scores else None,
        "Verdict/scores/geometry": scores.geometry if scores else None,
        "Verdict/threshold_version": verdict.threshold_version,
        "Verdict/decided": _datetime(verdict.decided_ms),
        "Verdict/deadline": _datetime(verdict.deadline_ms),
    }
    return {name: (VERDICT_METRICS[name], value) for name, value in values.items()}


def _names(value: object) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, list | tuple) else ""


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def node_values(health: Mapping[str, object] | None, versions: Mapping[str, str],
                node_info: Mapping[str, str], dropped: int) -> dict[str, Value]:
    """The node's own metrics: what it is (`Node Info/…`) and its health (`Node/…`).

    `health` is `Node.health()` (None: nobody watches the node, only this channel's own
    counter is reported).
    """
    values: dict[str, Value] = {f"Node Info/{k}": (T.STRING, v) for k, v in node_info.items()}
    values.update({f"Node Info/models/{k}": (T.STRING, v) for k, v in sorted(versions.items())})
    values["Node/verdicts_dropped"] = (T.UINT64, dropped)
    if health is None:
        return values
    stalled = _names(health.get("stalled_stages"))
    degraded = _names(health.get("degraded"))
    values.update({
        "Node/stalled": (T.BOOLEAN, bool(stalled)),
        "Node/stalled_stages": (T.STRING, stalled),
        "Node/degraded": (T.BOOLEAN, bool(degraded)),
        "Node/degraded_detail": (T.STRING, degraded),
        "Node/broker_connected": (T.BOOLEAN, health.get("broker_connected") is True),
        "Node/deadline_misses": (T.UINT64, _count(health.get("deadline_misses"))),
        "Node/in_flight": (T.UINT64, _count(health.get("in_flight"))),
        "Node/outbox_depth": (T.UINT64, _count(health.get("outbox_depth"))),
    })
    return values


def camera_states(health: Mapping[str, object] | None) -> dict[str, str]:
    """Per camera (a Sparkplug device): `streaming`, `waiting` or `failed: why`."""
    cameras = health.get("cameras") if health is not None else None
    if not isinstance(cameras, Mapping):
        return {}
    return {str(cid): str(state) for cid, state in cameras.items()}


def _metrics(values: Mapping[str, Value], ts: int) -> tuple[spb.Metric, ...]:
    return tuple(spb.Metric(timestamp=ts, name=name, datatype=dtype, value=value,
                            is_null=value is None)
                 for name, (dtype, value) in values.items())


def nbirth(ts: int, bd_seq: int, node: Mapping[str, Value]) -> bytes:
    """NBIRTH, seq 0: every node metric there will ever be data for (verdicts null)."""
    values: dict[str, Value] = {BDSEQ: (T.INT64, bd_seq), REBIRTH: (T.BOOLEAN, False),
                                **node, **{n: (t, None) for n, t in VERDICT_METRICS.items()}}
    return spb.NBirth(timestamp=ts, seq=0, metrics=_metrics(values, ts)).encode()


def ndata(ts: int, seq: int, values: Mapping[str, Value], metric_ts: int | None = None) -> bytes:
    """NDATA with `values`, stamped `metric_ts` (when they were true; default `ts`)."""
    metrics = _metrics(values, ts if metric_ts is None else metric_ts)
    return spb.NData(timestamp=ts, seq=seq, metrics=metrics).encode()


def ndeath(ts: int, bd_seq: int) -> bytes:
    """NDEATH: the bdSeq of the session it ends (the will, and a clean stop)."""
    metric = spb.Metric(timestamp=ts, name=BDSEQ, datatype=T.INT64, value=bd_seq)
    return spb.NDeath(timestamp=ts, bd_seq_metric=metric).encode()


def dbirth(ts: int, seq: int, state: str) -> bytes:
    """DBIRTH of a camera that streams."""
    values: dict[str, Value] = {"state": (T.STRING, state),
                                "streaming": (T.BOOLEAN, state == "streaming")}
    return spb.DBirth(timestamp=ts, seq=seq, metrics=_metrics(values, ts)).encode()


def ddeath(ts: int, seq: int) -> bytes:
    """DDEATH of a camera that stopped streaming."""
    return spb.DDeath(timestamp=ts, seq=seq).encode()


#: The commands the node takes, as declared in its NBIRTH: a command's metrics need not say
#: their datatype (Sparkplug B), the birth does.
_COMMANDS = spb.NBirth(timestamp=0, seq=0, metrics=(
    spb.Metric(timestamp=None, name=REBIRTH, datatype=T.BOOLEAN, value=False),))


def rebirth_requested(raw: bytes) -> bool:
    """Whether an NCMD asks for a rebirth (`Node Control/Rebirth` = true). Raises for a
    payload that does not decode or names a metric the node has no command for."""
    metrics: Iterable[spb.Metric] = spb.NCmd.decode(raw, birth=_COMMANDS).metrics
    return any(m.name == REBIRTH and m.value is True for m in metrics)


def topic(group_id: str, kind: MessageType, edge_node_id: str,
          device_id: str | None = None) -> str:
    return str(spb.Topic(group_id=group_id, message_type=kind, edge_node_id=edge_node_id,
                         device_id=device_id))


class BdSeqStore:
    """The birth/death sequence number: a new one for every MQTT session, never reused after
    a restart (a host would take the old session's late NDEATH for the new one's)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._next = 0
        with contextlib.suppress(OSError, ValueError):  # none yet, or unreadable: start at 0
            self._next = int(path.read_text(encoding="ascii").strip()) % SEQ_MODULO

    def claim(self) -> int:
        """The bdSeq of the session about to connect; the file then names the next one, so a
        crash after the connect cannot make a later session reuse it."""
        bd_seq = self._next
        self._next = (bd_seq + 1) % SEQ_MODULO
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, f"{self._next}\n")
        except OSError as exc:
            log.error("sparkplug.bdseq_not_saved", path=str(self.path), error=str(exc))
        return bd_seq
