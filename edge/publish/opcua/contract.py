"""The OPC UA contract with PLCs and SCADA: namespace, node IDs, types, the Reasons bit mask.

Every node the server adds has a string node ID in the namespace `opcua.namespace_uri`, so a
PLC program keeps working across restarts and nodes; its index (usually 2) is what a client
looks up by URI. docs/opcua.md lists these IDs, and a test holds the two together.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from edge.types import Decision, Reason

#: OPC UA built-in types the contract uses (asyncua's VariantType names).
UaType = Literal["Boolean", "UInt32", "Int32", "Int64", "Double", "String", "LocalizedText",
                 "DateTime"]


@dataclass(frozen=True, slots=True)
class Field:
    """One value of a result, as a variable, an event field or a method output."""

    name: str
    type: UaType
    doc: str
    #: the VerdictDecision enumeration rather than a plain Int32
    enum: bool = False


#: What a result carries, in this order wherever it appears.
RESULT_FIELDS: tuple[Field, ...] = (
    Field("Seq", "UInt32", "the verdict's seq, as on MQTT (modulo 2^32); +1 per verdict"),
    Field("ItemId", "String", "the item ID the controller announced"),
    Field("ProductId", "String", "its product ID ('' when unknown)"),
    Field("Decision", "Int32", "VerdictDecision: 0 = Pass, 1 = Sideline", enum=True),
    Field("FailSafe", "Boolean", "no inspection in time: the configured fail-safe decision"),
    Field("Late", "Boolean", "decided after the divert deadline: audit only, never act on it"),
    Field("Reasons", "UInt32", "bit mask of reasons (table below)"),
    Field("FusedScore", "Double", "fused damage score 0..1; -1 when there is none (fail-safe)"),
    Field("DeadlineMs", "Int64", "the divert deadline, ms since the Unix epoch (UTC)"),
    Field("ResultJson", "String", "the whole verdict, as the MQTT …/verdict payload"),
)

#: The flat block for simple PLC clients: the result fields but the JSON, then the handshake.
PLC_FIELDS: tuple[Field, ...] = (
    *(f for f in RESULT_FIELDS if f.name != "ResultJson"),
    Field("ResultValid", "Boolean", "true: the block holds a result waiting for ResultAck"),
    Field("ResultAck", "UInt32", "written by the PLC: the Seq it has taken (the only "
          "writable node)"),
    Field("Missed", "UInt32", "results whose deadline (or ack timeout) passed unacknowledged"),
)

VISION_SYSTEM = "VisionSystem"
STATE_MACHINE = "VisionSystem.VisionStateMachine"
CURRENT_STATE = "VisionSystem.VisionStateMachine.CurrentState"
ERROR_TEXT = "VisionSystem.ErrorText"
MODEL_VERSIONS = "VisionSystem.ModelVersions"
CALIBRATION_OK = "VisionSystem.CalibrationOk"
CALIBRATION_STATUS = "VisionSystem.CalibrationStatus"
RESULT_MANAGEMENT = "VisionSystem.ResultManagement"
LATEST_RESULT = "VisionSystem.ResultManagement.LatestResult"
RECENT_ITEM_IDS = "VisionSystem.ResultManagement.RecentItemIds"
GET_RESULT = "VisionSystem.ResultManagement.GetResultByItemId"
PLC = "PLC"
RESULT_READY_EVENT = "ResultReadyEventType"
DECISION_TYPE = "VerdictDecision"

#: VisionStateMachine.CurrentState values (OPC 40100's top-level states the node uses).
STATE_PREOPERATIONAL = "Preoperational"
STATE_OPERATIONAL = "Operational"
STATE_ERROR = "Error"


@dataclass(frozen=True, slots=True)
class VisionState:
    """What the VisionSystem object shows of the node."""

    #: empty: nothing wrong; else what is (CurrentState Error)
    error: str = ""
    #: still starting (a camera the node needs has sent no frame yet): Preoperational
    starting: bool = False
    model_versions: Mapping[str, str] = field(default_factory=dict)
    #: belt calibration check per camera (none run yet: empty)
    calibration_ok: Mapping[str, bool] = field(default_factory=dict)

    @property
    def current(self) -> str:
        if self.error:
            return STATE_ERROR
        return STATE_PREOPERATIONAL if self.starting else STATE_OPERATIONAL


def plc_node(name: str) -> str:
    return f"{PLC}.{name}"


def latest_node(name: str) -> str:
    return f"{LATEST_RESULT}.{name}"


def event_field_node(name: str) -> str:
    return f"{RESULT_READY_EVENT}.{name}"


#: Decision -> VerdictDecision value.
DECISION_VALUES: Mapping[Decision, int] = {Decision.PASS: 0, Decision.SIDELINE: 1}
DECISION_NAMES: tuple[str, ...] = ("Pass", "Sideline")

#: Reason -> bit in `Reasons`. Written out, not derived from the enum's order: a PLC program
#: depends on these positions, so a new reason takes the next free bit and none ever moves.
REASON_BITS: Mapping[Reason, int] = {
    Reason.DAMAGE: 0,
    Reason.ANOMALY: 1,
    Reason.GEOMETRY: 2,
    Reason.TIMEOUT: 3,
    Reason.NOT_SEEN: 4,
    Reason.UNANNOUNCED: 5,
    Reason.MERGED: 6,
    Reason.NO_GALLERY: 7,
    Reason.NO_DEPTH: 8,
    Reason.VIEWS_MISSING: 9,
    Reason.SHUTDOWN: 10,
    Reason.ERROR: 11,
    Reason.OUT_OF_DISTRIBUTION: 12,
}


def reasons_mask(reasons: Iterable[Reason]) -> int:
    """The `Reasons` bit mask of `reasons`."""
    mask = 0
    for reason in reasons:
        mask |= 1 << REASON_BITS[reason]
    return mask


def reasons_from_mask(mask: int) -> list[Reason]:
    """The reasons set in `mask`, in bit order (for clients and tests)."""
    return [r for r, bit in sorted(REASON_BITS.items(), key=lambda kv: kv[1]) if mask >> bit & 1]


def all_node_ids() -> list[str]:
    """Every string node ID the server adds (the documented table)."""
    ids = [VISION_SYSTEM, STATE_MACHINE, CURRENT_STATE, ERROR_TEXT, MODEL_VERSIONS,
           CALIBRATION_OK, CALIBRATION_STATUS, RESULT_MANAGEMENT, LATEST_RESULT,
           RECENT_ITEM_IDS, GET_RESULT, PLC, RESULT_READY_EVENT, DECISION_TYPE]
    ids += [latest_node(f.name) for f in RESULT_FIELDS]
    ids += [event_field_node(f.name) for f in RESULT_FIELDS]
    ids += [plc_node(f.name) for f in PLC_FIELDS]
    return ids
