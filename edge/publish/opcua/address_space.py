"""The server's nodes, modelled on OPC 40100 (Machine Vision), plus the flat PLC block.

Objects/
  VisionSystem                      the vision system: its state, models and calibration
    VisionStateMachine/CurrentState   Preoperational, Operational or Error (40100's states)
    ResultManagement                the latest result, the last N by item ID, a method
      LatestResult/<fields>
      RecentItemIds                 the items GetResultByItemId knows, oldest first
      GetResultByItemId(ItemId)
  PLC/<fields>                      one result at a time, with the ResultAck handshake
Types: ResultReadyEventType (raised by VisionSystem and by Server on each result),
VerdictDecision (Pass, Sideline).

The 40100 companion's own types (VisionSystemType, ResultDataType...) are not imported: the
nodes follow its structure and names, with plain built-in types a PLC can read.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from asyncua import Node, Server, ua
from asyncua.common.structures104 import new_enum
from asyncua.server.event_generator import EventGenerator

from edge.publish.opcua import contract as c
from edge.publish.opcua.contract import Field

#: Called with the method's object node and its input arguments (asyncua's convention).
MethodCallback = Callable[..., Awaitable[ua.CallMethodResult]]


def nid(name: str, idx: int) -> ua.NodeId:
    """A string node ID (asyncua types its fields as its own int and str subclasses)."""
    return ua.NodeId(ua.String(name), ua.Int16(idx))


def status(code: int) -> ua.StatusCode:
    return ua.StatusCode(ua.UInt32(code))


def _vtype(f: Field) -> ua.VariantType:
    return ua.VariantType[f.type]


def _initial(f: Field) -> object:
    return {"Boolean": False, "String": "", "Double": 0.0, "LocalizedText": ua.LocalizedText(""),
            "DateTime": dt.datetime.now(dt.timezone.utc)}.get(f.type, 0)


@dataclass(slots=True)
class Nodes:
    """What the server writes after start-up."""

    server: Server
    idx: int
    events: Sequence[EventGenerator]

    def nid(self, node_id: str) -> ua.NodeId:
        return nid(node_id, self.idx)

    async def write(self, node_id: str, value: object, vtype: ua.VariantType) -> None:
        # Straight to the attribute (no access checks: this is the server's own write); the
        # subscribed clients' data-change notifications follow from it.
        now = ua.DateTime.now(dt.timezone.utc)
        await self.server.write_attribute_value(
            self.nid(node_id), ua.DataValue(ua.Variant(value, vtype), SourceTimestamp=now,
                                            ServerTimestamp=now))

    async def write_fields(self, prefix: Callable[[str], str], fields: Sequence[Field],
                           values: dict[str, object]) -> None:
        for f in fields:
            if f.name in values:
                await self.write(prefix(f.name), values[f.name], _vtype(f))


async def _add_fields(parent: Node, idx: int, fields: Sequence[Field],
                      node_id: Callable[[str], str], decision_type: ua.NodeId) -> None:
    for f in fields:
        await parent.add_variable(nid(node_id(f.name), idx), ua.QualifiedName(f.name, idx),
                                  _initial(f), varianttype=_vtype(f),
                                  datatype=decision_type if f.enum else None)


async def _decision_type(server: Server, idx: int) -> ua.NodeId:
    dtype = await new_enum(server, nid(c.DECISION_TYPE, idx),
                           ua.QualifiedName(c.DECISION_TYPE, idx), list(c.DECISION_NAMES))
    # EnumStrings too: what most clients (and PLC engineering tools) read to name the values.
    await dtype.add_property(nid(f"{c.DECISION_TYPE}.EnumStrings", idx),
                             ua.QualifiedName("EnumStrings", 0),
                             [ua.LocalizedText(n) for n in c.DECISION_NAMES],
                             varianttype=ua.VariantType.LocalizedText)
    return dtype.nodeid


async def _event_type(server: Server, idx: int, decision_type: ua.NodeId) -> Node:
    base = server.get_node(ua.ObjectIds.BaseEventType)
    etype = await base.add_object_type(nid(c.RESULT_READY_EVENT, idx),
                                       ua.QualifiedName(c.RESULT_READY_EVENT, idx))
    for f in c.RESULT_FIELDS:
        await etype.add_property(nid(c.event_field_node(f.name), idx),
                                 ua.QualifiedName(f.name, idx), _initial(f),
                                 varianttype=_vtype(f),
                                 datatype=decision_type if f.enum else None)
    return etype


async def _vision_system(server: Server, idx: int, decision_type: ua.NodeId,
                         get_result: MethodCallback) -> Node:
    vs = await server.nodes.objects.add_object(nid(c.VISION_SYSTEM, idx),
                                               ua.QualifiedName(c.VISION_SYSTEM, idx))
    sm = await vs.add_object(nid(c.STATE_MACHINE, idx),
                             ua.QualifiedName("VisionStateMachine", idx))
    await sm.add_variable(nid(c.CURRENT_STATE, idx), ua.QualifiedName("CurrentState", idx),
                          ua.LocalizedText(c.STATE_PREOPERATIONAL),
                          varianttype=ua.VariantType.LocalizedText)
    for node_id, value, vtype in (
            (c.ERROR_TEXT, "", ua.VariantType.String),
            (c.MODEL_VERSIONS, [], ua.VariantType.String),
            (c.CALIBRATION_OK, True, ua.VariantType.Boolean),
            (c.CALIBRATION_STATUS, [], ua.VariantType.String)):
        await vs.add_variable(nid(node_id, idx),
                              ua.QualifiedName(node_id.rsplit(".", 1)[1], idx), value,
                              varianttype=vtype)
    rm = await vs.add_object(nid(c.RESULT_MANAGEMENT, idx),
                             ua.QualifiedName("ResultManagement", idx))
    latest = await rm.add_object(nid(c.LATEST_RESULT, idx),
                                 ua.QualifiedName("LatestResult", idx))
    await _add_fields(latest, idx, c.RESULT_FIELDS, c.latest_node, decision_type)
    await rm.add_variable(nid(c.RECENT_ITEM_IDS, idx), ua.QualifiedName("RecentItemIds", idx),
                          [], varianttype=ua.VariantType.String)
    await rm.add_method(nid(c.GET_RESULT, idx), ua.QualifiedName("GetResultByItemId", idx),
                        get_result, [_argument("ItemId", "String", "the item ID")],
                        _method_outputs(decision_type))
    return vs


def _argument(name: str, type_name: str, doc: str,
              data_type: ua.NodeId | None = None) -> ua.Argument:
    builtin = ua.NodeId(ua.Int32(ua.VariantType[type_name].value))
    return ua.Argument(Name=name, DataType=data_type or builtin, ValueRank=-1,
                       ArrayDimensions=[], Description=ua.LocalizedText(doc))


def _method_outputs(decision_type: ua.NodeId) -> list[ua.Argument]:
    outs = [_argument("Found", "Boolean", "false: no result for this item among the kept ones")]
    outs += [_argument(f.name, f.type, f.doc, decision_type if f.enum else None)
             for f in c.RESULT_FIELDS]
    return outs


async def build_address_space(server: Server, namespace_uri: str,
                              get_result: MethodCallback) -> Nodes:
    """Add the nodes (before `server.start()`); return what writes to them later."""
    idx = await server.register_namespace(namespace_uri)
    decision_type = await _decision_type(server, idx)
    etype = await _event_type(server, idx, decision_type)
    vs = await _vision_system(server, idx, decision_type, get_result)
    plc = await server.nodes.objects.add_object(nid(c.PLC, idx),
                                                ua.QualifiedName(c.PLC, idx))
    await _add_fields(plc, idx, c.PLC_FIELDS, c.plc_node, decision_type)
    ack = server.get_node(nid(c.plc_node("ResultAck"), idx))
    await ack.set_writable(True)  # the one node a client may write (access levels)
    # Raised by the vision system, as 40100 has it, and by the Server object, where most
    # SCADA clients subscribe to events.
    events = [await server.get_event_generator(etype, vs.nodeid),
              await server.get_event_generator(etype, ua.ObjectIds.Server)]
    return Nodes(server, idx, events)


def method_result(code: int, outputs: Sequence[ua.Variant] = (),
                  inputs: Sequence[ua.StatusCode] = ()) -> ua.CallMethodResult:
    result = ua.CallMethodResult()
    result.StatusCode = status(code)
    result.OutputArguments = list(outputs)
    result.InputArgumentResults = list(inputs)
    return result


def result_outputs(values: dict[str, object] | None) -> list[ua.Variant]:
    """GetResultByItemId's outputs: Found, then every result field (defaults when not found)."""
    outs = [ua.Variant(values is not None, ua.VariantType.Boolean)]
    for f in c.RESULT_FIELDS:
        value = values[f.name] if values is not None else _initial(f)
        outs.append(ua.Variant(value, _vtype(f)))
    return outs
