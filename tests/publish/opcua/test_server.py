"""The OPC UA server through asyncua's client: the PLC block's handshake, results, events,
refused writes, and a hot path that never waits for the server."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from collections.abc import Iterator

import pytest
from asyncua import ua
from prometheus_client import CollectorRegistry, generate_latest

from edge.clock import WallClock
from edge.config import NodeConfig, OpcUaConfig
from edge.publish.broker import free_port
from edge.publish.opcua.channel import OpcUaChannel
from edge.publish.opcua.contract import REASON_BITS, VisionState, all_node_ids
from edge.publish.opcua.security import Users
from edge.publish.opcua.server import Stats, _ConnectionGate
from edge.types import Decision, Reason
from tests.publish.helpers import make_verdict
from tests.publish.opcua.helpers import (
    Changes,
    Served,
    connected,
    eventually,
    next_seq,
    nid,
    read,
    serve,
    write_ack,
)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    """One loopback server (no security, anonymous) for the module: starting one takes
    seconds (asyncua builds its standard address space)."""
    cfg = OpcUaConfig(enabled=True, port=free_port(), security=("none",),
                      allow_anonymous=True, results_kept=5, queue_size=64)
    s = serve(cfg)
    yield s
    s.channel.stop(2.0)


@pytest.fixture(autouse=True)
def idle_block(served: Served) -> Iterator[None]:
    """Each test starts with nothing waiting in the PLC block (acknowledged, or expired)."""
    yield

    async def settle() -> None:
        async with connected(served.url) as (client, idx):
            handshake = served.channel._loop.handshake
            end = time.monotonic() + 10.0
            while (handshake.waiting or handshake.queued) and time.monotonic() < end:
                if await read(client, idx, "PLC.ResultValid"):
                    await write_ack(client, idx, await read(client, idx, "PLC.Seq"))
                await asyncio.sleep(0.02)

    asyncio.run(settle())


def test_plc_block_holds_each_result_until_the_plc_acknowledges_it(served: Served) -> None:
    """The block shows one result at a time: the next only once ResultAck holds the Seq."""

    async def run() -> None:
        async with connected(served.url) as (client, idx):
            _, seq_a = served.offer("HS-A", decision=Decision.SIDELINE)
            _, seq_b = served.offer("HS-B")

            async def shows(seq: int) -> bool:
                return (await read(client, idx, "PLC.Seq") == seq
                        and await read(client, idx, "PLC.ResultValid"))

            assert await eventually(lambda: shows(seq_a))
            assert await read(client, idx, "PLC.ItemId") == "HS-A"
            assert await read(client, idx, "PLC.Decision") == 1  # Sideline
            assert await read(client, idx, "PLC.Reasons") == 1 << REASON_BITS[Reason.DAMAGE]
            await asyncio.sleep(0.3)
            assert await read(client, idx, "PLC.Seq") == seq_a  # B waits behind A
            assert (await write_ack(client, idx, seq_a)).is_good()
            assert await eventually(lambda: shows(seq_b))
            assert await read(client, idx, "PLC.ItemId") == "HS-B"
            assert await read(client, idx, "PLC.Decision") == 0  # Pass
            assert await read(client, idx, "PLC.ResultAck") == seq_a

    acked = served.channel.stats.acked
    asyncio.run(run())
    assert served.channel.stats.acked == acked + 1


def test_a_result_unacknowledged_at_its_deadline_is_withdrawn_and_counted_missed(
        served: Served) -> None:
    """Past its divert deadline without ResultAck: withdrawn, counted in PLC.Missed, the
    metrics and an `…/events` event; the result behind it is shown."""
    missed = served.channel.stats.missed["deadline"]

    async def run() -> None:
        async with connected(served.url) as (client, idx):
            before = await read(client, idx, "PLC.Missed")
            _, seq_a = served.offer("MISS-A", deadline_in_ms=500.0)
            _, seq_b = served.offer("MISS-B")

            async def b_shown() -> bool:
                return await read(client, idx, "PLC.Seq") == seq_b

            assert await eventually(lambda: read_is(client, idx, "PLC.Seq", seq_a))
            assert await eventually(b_shown, 3.0)
            assert await read(client, idx, "PLC.ResultValid")
            assert await read(client, idx, "PLC.Missed") == before + 1

    asyncio.run(run())
    assert served.channel.stats.missed["deadline"] == missed + 1
    kinds = [(kind, d["item_id"]) for kind, d in served.events]
    assert ("opcua_result_missed", "MISS-A") in kinds
    text = generate_latest(served.registry).decode()
    assert f'cv_opcua_results_missed_total{{why="deadline"}} {missed + 1}.0' in text


async def read_is(client: object, idx: int, name: str, value: object) -> bool:
    return await read(client, idx, name) == value  # type: ignore[arg-type]


def test_get_result_by_item_id_answers_from_the_last_results_kept(served: Served) -> None:
    """GetResultByItemId returns a kept result's fields and JSON, Found false for others,
    and a bad status for an argument of the wrong type."""

    async def call(client: object, idx: int, *args: ua.Variant) -> ua.CallMethodResult:
        request = ua.CallMethodRequest(
            ObjectId=nid(idx, "VisionSystem.ResultManagement"),
            MethodId=nid(idx, "VisionSystem.ResultManagement.GetResultByItemId"),
            InputArguments=list(args))
        return (await client.uaclient.call([request]))[0]  # type: ignore[attr-defined]

    async def run() -> None:
        async with connected(served.url) as (client, idx):
            seqs = {f"GET-{i}": served.offer(f"GET-{i}", decision=Decision.SIDELINE)[1]
                    for i in range(6)}  # one more than results_kept
            assert await eventually(lambda: read_is(
                client, idx, "VisionSystem.ResultManagement.LatestResult.ItemId", "GET-5"))
            found = await call(client, idx, ua.Variant("GET-3", ua.VariantType.String))
            assert found.StatusCode.is_good()
            out = [v.Value for v in found.OutputArguments]
            assert out[:4] == [True, seqs["GET-3"], "GET-3", "box-small"]
            assert out[4] == 1  # Sideline
            assert '"item_id":"GET-3"' in out[-1]
            gone = await call(client, idx, ua.Variant("GET-0", ua.VariantType.String))
            assert gone.StatusCode.is_good()
            assert gone.OutputArguments[0].Value is False
            recent = await read(client, idx, "VisionSystem.ResultManagement.RecentItemIds")
            assert recent[-5:] == [f"GET-{i}" for i in range(1, 6)]
            wrong = await call(client, idx, ua.Variant(3, ua.VariantType.Int32))
            assert wrong.StatusCode.value == ua.StatusCodes.BadInvalidArgument
            none = await call(client, idx)
            assert none.StatusCode.value == ua.StatusCodes.BadArgumentsMissing

    asyncio.run(run())


def test_every_result_raises_a_result_ready_event(served: Served) -> None:
    """Each result raises ResultReadyEventType on VisionSystem and on Server, with its
    fields; a late result too (never shown in the PLC block)."""

    async def run() -> None:
        async with connected(served.url) as (client, idx):
            changes = Changes()
            sub = await client.create_subscription(20, changes)
            etype = client.get_node(nid(idx, "ResultReadyEventType"))
            await sub.subscribe_events(client.get_node(nid(idx, "VisionSystem")), etype)
            await sub.subscribe_events(client.nodes.server, etype)
            await asyncio.sleep(0.2)
            verdict, seq = served.offer("EV-1", decision=Decision.SIDELINE)
            late = dataclasses.replace(served.offer("EV-X")[0], item_id="EV-LATE", late=True)
            served.channel.offer(late, next_seq())
            assert await eventually(lambda: _count(changes, 6))
            by_item = [e for e in changes.events if e["ItemId"] == "EV-1"]
            assert len(by_item) == 2  # from VisionSystem and from Server
            event = by_item[0]
            assert event["Seq"] == seq
            assert event["Decision"] == 1
            assert event["FusedScore"] == pytest.approx(0.5)
            assert event["DeadlineMs"] == round(verdict.deadline_ms)
            assert '"item_id":"EV-1"' in event["ResultJson"]
            late_events = [e for e in changes.events if e["ItemId"] == "EV-LATE"]
            assert len(late_events) == 2
            assert late_events[0]["Late"] is True
            await sub.delete()

    asyncio.run(run())


async def _count(changes: Changes, n: int) -> bool:
    return len(changes.events) >= n


def test_writes_to_anything_but_result_ack_are_refused(served: Served) -> None:
    """Every node but PLC.ResultAck is read-only to clients (and no attribute but a Value
    may be written): the write gets a bad status and the value stays."""

    async def run() -> None:
        async with connected(served.url) as (client, idx):
            served.offer("RO-1")
            assert await eventually(lambda: read_is(client, idx, "PLC.ItemId", "RO-1"))
            for name, value, vtype in (
                    ("PLC.ItemId", "forged", ua.VariantType.String),
                    ("PLC.ResultValid", False, ua.VariantType.Boolean),
                    ("PLC.Seq", 1, ua.VariantType.UInt32),
                    ("VisionSystem.ModelVersions", ["x=y"], ua.VariantType.String)):
                wv = ua.WriteValue(NodeId=nid(idx, name), AttributeId=ua.AttributeIds.Value,
                                   Value=ua.DataValue(ua.Variant(value, vtype)))
                status = (await client.uaclient.write(ua.WriteParameters(NodesToWrite=[wv])))[0]
                assert status.value == ua.StatusCodes.BadUserAccessDenied, name
            rename = ua.WriteValue(NodeId=nid(idx, "PLC.ResultAck"),
                                   AttributeId=ua.AttributeIds.DisplayName,
                                   Value=ua.DataValue(ua.Variant(ua.LocalizedText("x"))))
            status = (await client.uaclient.write(ua.WriteParameters(NodesToWrite=[rename])))[0]
            assert status.is_bad()
            assert await read(client, idx, "PLC.ItemId") == "RO-1"
            assert await read(client, idx, "PLC.ResultValid") is True

    refused = served.channel.stats.writes_refused
    asyncio.run(run())
    assert served.channel.stats.writes_refused == refused + 5


def test_malformed_acknowledgements_are_refused_and_leave_the_block_unharmed(
        served: Served) -> None:
    """ResultAck of the wrong type, an array, a bad status, an index range or a Seq not
    shown: each refused with its status code; the result still waits, and a proper ack
    then takes it."""

    async def run() -> None:
        async with connected(served.url) as (client, idx):
            _, seq = served.offer("BAD-ACK")
            assert await eventually(lambda: read_is(client, idx, "PLC.Seq", seq))
            before = await read(client, idx, "PLC.ResultAck")
            codes = ua.StatusCodes
            cases = [
                (await write_ack(client, idx, seq, ua.VariantType.Int32), codes.BadTypeMismatch),
                (await write_ack(client, idx, "x", ua.VariantType.String), codes.BadTypeMismatch),
                (await write_ack(client, idx, [seq, seq]), codes.BadTypeMismatch),
                (await write_ack(client, idx, seq + 1), codes.BadOutOfRange),
                (await write_ack(client, idx, seq, StatusCode=ua.StatusCode(codes.BadNoData)),
                 codes.BadWriteNotSupported),
            ]
            ranged = ua.WriteValue(NodeId=nid(idx, "PLC.ResultAck"),
                                   AttributeId=ua.AttributeIds.Value, IndexRange="0",
                                   Value=ua.DataValue(ua.Variant(seq, ua.VariantType.UInt32)))
            cases.append(((await client.uaclient.write(
                ua.WriteParameters(NodesToWrite=[ranged])))[0], codes.BadIndexRangeInvalid))
            empty = ua.WriteValue(NodeId=nid(idx, "PLC.ResultAck"),
                                  AttributeId=ua.AttributeIds.Value, Value=ua.DataValue())
            cases.append(((await client.uaclient.write(
                ua.WriteParameters(NodesToWrite=[empty])))[0], codes.BadTypeMismatch))
            for status, expected in cases:
                assert status.value == expected, status
            assert await read(client, idx, "PLC.ResultAck") == before
            assert await read(client, idx, "PLC.ResultValid") is True
            assert await read(client, idx, "PLC.Seq") == seq
            assert (await write_ack(client, idx, seq)).is_good()
            assert await read(client, idx, "PLC.ResultAck") == seq

    asyncio.run(run())


def test_offer_never_waits_for_a_stalled_client_or_a_stuck_server(served: Served) -> None:
    """With a client connected that never speaks and the server's loop stuck for a second,
    `offer` still returns at once; what the bounded queue cannot hold is dropped and
    counted, and the server takes the rest once it runs again."""
    channel = served.channel
    stalled = socket.create_connection(("127.0.0.1", channel.cfg.port))
    loop = channel._loop.loop
    assert loop is not None
    loop.call_soon_threadsafe(time.sleep, 1.0)  # the loop is busy for a second
    time.sleep(0.1)
    dropped, results = channel.stats.dropped, channel.stats.results
    n = channel.cfg.queue_size + 50
    took = []
    for i in range(n):  # deadlines passed: once taken in, they go straight to "missed"
        t0 = time.perf_counter()
        served.offer(f"FLOOD-{i}", deadline_in_ms=-1.0)
        took.append(time.perf_counter() - t0)
    assert channel.stats.dropped == dropped + 50
    assert max(took) < 0.02, max(took)
    assert sum(took) / n < 0.001, sum(took) / n
    deadline = time.monotonic() + 5.0
    while channel.stats.results < results + channel.cfg.queue_size and (
            time.monotonic() < deadline):
        time.sleep(0.05)
    assert channel.stats.results == results + channel.cfg.queue_size
    stalled.close()


def test_every_documented_node_exists_and_the_vision_system_shows_the_node(
        served: Served) -> None:
    """Each string node ID of the contract is on the server; VisionSystem shows the node's
    state (Operational, Error with why, Preoperational), model versions and calibration."""
    state = VisionState(model_versions={"damage": "effnet@3"},
                        calibration_ok={"top": True, "angled": False})
    served.channel.attach(state=lambda: state)

    async def run() -> None:
        nonlocal state
        async with connected(served.url) as (client, idx):
            for node_id in all_node_ids():
                name = await client.get_node(nid(idx, node_id)).read_browse_name()
                assert name.Name == node_id.rsplit(".", 1)[-1], node_id
            current = "VisionSystem.VisionStateMachine.CurrentState"

            async def shows(text: str) -> bool:
                return (await read(client, idx, current)).Text == text

            assert await eventually(lambda: shows("Operational"), 3.0)
            assert await read(client, idx, "VisionSystem.ModelVersions") == ["damage=effnet@3"]
            assert await read(client, idx, "VisionSystem.CalibrationOk") is False
            assert await read(client, idx, "VisionSystem.CalibrationStatus") == [
                "angled=failed", "top=ok"]
            state = VisionState(error="stage inference stalled")
            assert await eventually(lambda: shows("Error"), 3.0)
            assert await read(client, idx, "VisionSystem.ErrorText") == (
                "stage inference stalled")
            state = VisionState(starting=True)
            assert await eventually(lambda: shows("Preoperational"), 3.0)

    asyncio.run(run())


def test_connections_over_the_rate_are_closed_before_any_message() -> None:
    """Beyond `connects_per_s` (after a burst), a new connection is closed at once, counted,
    and never listed; the budget refills with time."""

    class Transport:
        closed = False

        def close(self) -> None:
            self.closed = True

    class Protocol:
        def __init__(self) -> None:
            self.transport = Transport()

    stats = Stats()
    gate = _ConnectionGate(per_s=10.0, burst=2.0, stats=stats)
    protocols = [Protocol() for _ in range(3)]
    for p in protocols:
        gate.append(p)
    assert [p.transport.closed for p in protocols] == [False, False, True]
    assert list(gate) == protocols[:2]
    assert stats.connections_refused == 1
    time.sleep(0.15)
    late = Protocol()
    gate.append(late)
    assert not late.transport.closed


def test_a_server_that_cannot_listen_is_reported_and_costs_offer_nothing() -> None:
    """A port already taken: the channel says so (`failed`, cv_opcua_up 0) and `offer`
    still returns at once, dropping what its queue cannot hold."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    cfg = OpcUaConfig(enabled=True, port=taken.getsockname()[1], security=("none",),
                      allow_anonymous=True, queue_size=4)
    channel = OpcUaChannel(cfg, NodeConfig(), WallClock(), users=Users())
    registry = CollectorRegistry()
    channel.attach(registry=registry)
    try:
        channel.start()
        assert not channel.wait_ready(30.0)
        assert isinstance(channel.failed, OSError)
        for i in range(6):
            channel.offer(make_verdict(f"NOWHERE-{i}"), i)
        assert channel.stats.dropped == 2
        assert "cv_opcua_up 0.0" in generate_latest(registry).decode()
    finally:
        channel.stop(1.0)
        taken.close()
