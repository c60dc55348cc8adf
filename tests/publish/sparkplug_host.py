"""A SCADA primary host for the Sparkplug B tests: a plain paho subscriber on `spBv1.0/#`
that decodes what it gets as a host does, and a second decoder from the published schema."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pysparkplug as spb
import pytest
from grpc_tools import protoc

from tests.publish.helpers import Collector, Received, wait_until

PROTO = Path(__file__).with_name("sparkplug_b_subset.proto")
GROUP, EDGE = "plant-1", "edge-07"
REBIRTH = "Node Control/Rebirth"
_PAYLOADS: dict[str, Any] = {"NBIRTH": spb.NBirth, "NDATA": spb.NData, "DBIRTH": spb.DBirth,
                             "DDATA": spb.DData}


@dataclasses.dataclass(frozen=True)
class Message:
    """One Sparkplug message as the host decoded it."""

    kind: str
    device: str | None
    seq: int | None
    metrics: dict[str, Any]  # name -> value (None: null)
    raw: bytes


def decode(received: Received, births: dict[str | None, Any]) -> Message | None:
    """As a host does: data metrics carry no datatype (Sparkplug B), the last birth of the node
    or device gives it; data before any birth is not understood (None)."""
    topic = spb.Topic.from_str(received.topic)
    kind = str(topic.message_type)
    if kind == "NCMD":  # the host's own
        return None
    if kind == "NDEATH":
        death = spb.NDeath.decode(received.payload)
        return Message(kind, None, None, {death.bd_seq_metric.name: death.bd_seq_metric.value},
                       received.payload)
    if kind == "DDEATH":
        ddeath = spb.DDeath.decode(received.payload)
        return Message(kind, topic.device_id, ddeath.seq, {}, received.payload)
    if kind in ("NDATA", "DDATA") and topic.device_id not in births:
        return None
    payload = _PAYLOADS[kind].decode(received.payload, birth=births.get(topic.device_id))
    if kind in ("NBIRTH", "DBIRTH"):
        births[topic.device_id] = payload
    return Message(kind, topic.device_id, getattr(payload, "seq", None),
                   {m.name: m.value for m in payload.metrics}, received.payload)


class Host:
    """The SCADA primary host: subscribes to `spBv1.0/#` and decodes what the edge node sent."""

    def __init__(self, collector: Collector) -> None:
        self.collector = collector

    def messages(self) -> list[Message]:
        """The edge node's messages, in order (the host's own commands left out)."""
        with self.collector._cond:
            received = list(self.collector.messages)
        births: dict[str | None, Any] = {}
        decoded = (decode(r, births) for r in received)
        return [m for m in decoded if m is not None]

    def of(self, kind: str) -> list[Message]:
        return [m for m in self.messages() if m.kind == kind]

    def verdicts(self) -> list[dict[str, Any]]:
        return [m.metrics for m in self.of("NDATA") if "Verdict/item_id" in m.metrics]

    def wait(self, predicate: Callable[[Host], bool], timeout_s: float = 5.0) -> bool:
        return wait_until(lambda: predicate(self), timeout_s, step_s=0.02)

    def command_rebirth(self) -> None:
        ncmd = spb.NCmd(timestamp=int(time.time() * 1000), metrics=(spb.Metric(
            timestamp=None, name=REBIRTH, datatype=spb.DataType.BOOLEAN, value=True),))
        self.collector.client.publish(f"spBv1.0/{GROUP}/NCMD/{EDGE}", ncmd.encode(), qos=1)


class FakeNode:
    """`Node.health()` as the channel reads it, changed by the test."""

    def __init__(self, **cameras: str) -> None:
        self.state: dict[str, Any] = {
            "stalled_stages": [], "failing_stages": [], "degraded": [],
            "cameras": dict(cameras), "broker_connected": True, "outbox_depth": 0,
            "in_flight": 0, "deadline_misses": 0}

    def health(self) -> dict[str, Any]:
        return copy.deepcopy(self.state)


def compile_schema(out: Path) -> Any:
    """The second decoder: the payload message of the schema, compiled with grpcio-tools."""
    shutil.copy(PROTO, out / PROTO.name)
    assert protoc.main(["protoc", f"-I{out}", f"--python_out={out}", str(out / PROTO.name)]) == 0
    spec = importlib.util.spec_from_file_location("sparkplug_b_subset_pb2",
                                                  out / "sparkplug_b_subset_pb2.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Payload


def check_with_schema(schema: Any, raw: bytes, expected: dict[str, tuple[int, str, Any]],
                         birth: bytes | None = None) -> None:
    """Decode with the schema; each named metric has (datatype, value field, value). Data
    (`birth` given) carries no datatype: the birth declares it."""
    metrics = {m.name: m for m in schema.FromString(raw).metrics}
    declared = {m.name: m for m in schema.FromString(birth or raw).metrics}
    for name, (datatype, field, value) in expected.items():
        metric = metrics[name]
        assert declared[name].datatype == datatype, name
        if birth is not None:
            assert not metric.HasField("datatype"), name
        assert metric.WhichOneof("value") == field, name
        if field is None:
            assert metric.is_null, name
        elif isinstance(value, float):
            assert getattr(metric, field) == pytest.approx(value), name
        else:
            assert getattr(metric, field) == value, name


def segments(messages: list[Message]) -> list[list[int | None]]:
    """The seqs of each run of messages that starts with an NBIRTH (NDEATH has none)."""
    runs: list[list[int | None]] = []
    for m in messages:
        if m.kind == "NBIRTH":
            runs.append([])
        if m.kind != "NDEATH":
            runs[-1].append(m.seq)
    return runs
