"""Test helpers for the OPC UA server: a started channel, clients, certificates."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry

from edge.clock import WallClock
from edge.config import NodeConfig, OpcUaConfig
from edge.publish.opcua.certs import key_pem, make_certificate
from edge.publish.opcua.channel import OpcUaChannel
from edge.publish.opcua.security import Users
from tests.publish.helpers import make_verdict

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from edge.types import Verdict

NAMESPACE = "urn:conveyor-vision:vision"
_seq = itertools.count(1000)


def next_seq() -> int:
    """A fresh outbox-like seq for each verdict a test offers."""
    return next(_seq)


@dataclass
class Served:
    """A started channel, what it published on `…/events`, its metrics registry."""

    channel: OpcUaChannel
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    @property
    def url(self) -> str:
        return self.channel.endpoint_url

    def offer(self, item_id: str, **kwargs: Any) -> tuple[Verdict, int]:
        verdict = make_verdict(item_id, **kwargs)
        seq = next_seq()
        self.channel.offer(verdict, seq)
        return verdict, seq


def serve(cfg: OpcUaConfig, users: Users | None = None) -> Served:
    """Start a channel on `cfg` (its `port`), with events and metrics captured."""
    channel = OpcUaChannel(cfg, NodeConfig(), WallClock(), users=users or Users())
    served = Served(channel)
    channel.attach(lambda kind, detail: served.events.append((kind, dict(detail))),
                   served.registry)
    channel.start()
    assert channel.wait_ready(30.0), channel.failed
    return served


@dataclass(frozen=True)
class ClientCert:
    cert: Path
    key: Path
    app_uri: str


def client_cert(folder: Path, name: str, trusted_dir: Path | None = None) -> ClientCert:
    """A client certificate (trusted: copied into `trusted_dir`)."""
    folder.mkdir(parents=True, exist_ok=True)
    uri = f"urn:conveyor-vision:test:{name}"
    cert, key = make_certificate(uri, ["localhost"], common_name=name, client=True)
    files = ClientCert(folder / f"{name}.der", folder / f"{name}.pem", uri)
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    files.key.write_bytes(key_pem(key))
    if trusted_dir is not None:
        shutil.copy(files.cert, trusted_dir / files.cert.name)
    return files


@asynccontextmanager
async def connected(url: str, *, user: str | None = None, password: str | None = None,
                    cert: ClientCert | None = None, server_cert: Path | None = None,
                    mode: ua.MessageSecurityMode = ua.MessageSecurityMode.SignAndEncrypt,
                    ) -> AsyncIterator[tuple[Client, int]]:
    """An asyncua client session, and the index of the node's namespace."""
    client = Client(url, timeout=5)
    if cert is not None:
        client.application_uri = cert.app_uri
        await client.set_security(SecurityPolicyBasic256Sha256, certificate=str(cert.cert),
                                  private_key=str(cert.key),
                                  server_certificate=str(server_cert) if server_cert else None,
                                  mode=mode)
    if user is not None:
        client.set_user(user)
        client.set_password(password or "")
    await client.connect()
    try:
        yield client, await client.get_namespace_index(NAMESPACE)
    finally:
        await client.disconnect()


def nid(idx: int, name: str) -> ua.NodeId:
    return ua.NodeId(name, idx)  # type: ignore[arg-type]


async def read(client: Client, idx: int, name: str) -> Any:
    return await client.get_node(nid(idx, name)).read_value()


async def write_ack(client: Client, idx: int, value: Any,
                    vtype: ua.VariantType = ua.VariantType.UInt32, **dv: Any) -> ua.StatusCode:
    """Write ResultAck; the per-node status, not an exception."""
    wv = ua.WriteValue(NodeId=nid(idx, "PLC.ResultAck"), AttributeId=ua.AttributeIds.Value,
                       Value=ua.DataValue(ua.Variant(value, vtype), **dv))
    return (await client.uaclient.write(ua.WriteParameters(NodesToWrite=[wv])))[0]


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if await check():
            return True
        await asyncio.sleep(0.02)
    return await check()


class Changes:
    """asyncua subscription handler: data changes and events, as they arrive."""

    def __init__(self) -> None:
        self.data: list[tuple[str, Any]] = []
        self.events: list[Mapping[str, Any]] = []

    def datachange_notification(self, node: Any, val: Any, _data: Any) -> None:
        self.data.append((str(node.nodeid.Identifier), val))

    def event_notification(self, event: Any) -> None:
        self.events.append({k: v.Value for k, v in
                            event.get_event_props_as_fields_dict().items()})
