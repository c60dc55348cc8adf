"""Broker address, credentials (never from the YAML, never logged), protocol fallback."""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import TYPE_CHECKING

import pytest

from edge.clock import WallClock
from edge.config import ConfigError, MqttConfig, NodeConfig
from edge.publish.connection import BrokerConfigError, load_credentials, parse_url
from edge.publish.mqtt import VerdictPublisher

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from tests.publish.conftest import NodeSide


def test_url_parsing() -> None:
    """mqtt:// and mqtts:// with default ports; credentials in the URL are refused."""
    assert parse_url("mqtt://127.0.0.1") == parse_url("mqtt://127.0.0.1:1883")
    assert parse_url("mqtts://broker.local").port == 8883
    assert parse_url("mqtts://broker.local").tls
    for bad in ("http://x:1", "mqtt://", "mqtt://u:p@host:1883", "mqtt://h:99999"):
        with pytest.raises(BrokerConfigError):
            parse_url(bad)


def test_credentials_precedence_file_env_systemd(tmp_path: Path) -> None:
    """A credentials file wins over the environment, which wins over the systemd credential;
    with none of them the connection is anonymous."""
    creds = tmp_path / "creds"
    creds.write_text("file-user:pa:ss\n")
    sysd = tmp_path / "credstore"
    sysd.mkdir()
    (sysd / "mqtt").write_text("systemd-user:s3cret")
    env = {"CV_MQTT_USERNAME": "env-user", "CV_MQTT_PASSWORD": "envpw",
           "CREDENTIALS_DIRECTORY": str(sysd)}
    got = load_credentials(MqttConfig(credentials_file=creds), env)
    assert got is not None
    assert (got.username, got.password) == ("file-user", "pa:ss")
    got = load_credentials(MqttConfig(), env)
    assert got is not None
    assert (got.username, got.password) == ("env-user", "envpw")
    got = load_credentials(MqttConfig(), {"CREDENTIALS_DIRECTORY": str(sysd)})
    assert got is not None
    assert (got.username, got.password, got.source) == (
        "systemd-user", "s3cret", "systemd credential 'mqtt'")
    assert load_credentials(MqttConfig(), {}) is None


def test_password_never_shows_in_repr(tmp_path: Path) -> None:
    """Credentials print as *** wherever they are logged or shown."""
    creds = tmp_path / "c"
    creds.write_text("user:hunter2")
    got = load_credentials(MqttConfig(credentials_file=creds), {})
    assert "hunter2" not in repr(got)
    assert "hunter2" not in str(got)


def test_malformed_credentials_file_is_a_clear_error(tmp_path: Path) -> None:
    """A credentials file without 'user:password' names the problem, not the content."""
    creds = tmp_path / "c"
    creds.write_text("just-a-password-XYZZY")
    with pytest.raises(BrokerConfigError, match="username:password") as err:
        load_credentials(MqttConfig(credentials_file=creds), {})
    assert "XYZZY" not in str(err.value)


REMOTE_PLAIN = "mqtt://broker.site.example:1883"


def _credential_sources(tmp_path: Path) -> list[dict[str, str]]:
    """The environment, and the systemd credential: both known only when the node starts."""
    sysd = tmp_path / "credstore"
    sysd.mkdir(exist_ok=True)
    (sysd / "mqtt").write_text("systemd-user:hunter2-XYZZY")
    return [{"CV_MQTT_USERNAME": "env-user", "CV_MQTT_PASSWORD": "hunter2-XYZZY"},
            {"CREDENTIALS_DIRECTORY": str(sysd)}]


def test_credentials_over_plain_mqtt_to_a_remote_broker_are_refused(tmp_path: Path) -> None:
    """Credentials from the environment or systemd with a plain mqtt:// broker beyond loopback
    are refused in one line saying why (clear text), without the password."""
    for env in _credential_sources(tmp_path):
        with pytest.raises(ConfigError) as err:
            load_credentials(MqttConfig(url=REMOTE_PLAIN), env)
        message = str(err.value)
        assert err.value.path == "mqtt.url"
        assert "clear text" in message
        assert "mqtt.allow_plaintext_credentials" in message
        assert "XYZZY" not in message
        assert "\n" not in message
    assert load_credentials(MqttConfig(url=REMOTE_PLAIN), {}) is None  # anonymous: nothing sent


def test_credentials_over_plain_mqtt_go_where_safe_or_opted_in(tmp_path: Path) -> None:
    """mqtts://, a loopback broker, or mqtt.allow_plaintext_credentials: the credentials load."""
    for env in _credential_sources(tmp_path):
        for cfg in (MqttConfig(url="mqtts://broker.site.example:8883"),
                    MqttConfig(url="mqtt://127.0.0.1:1883"), MqttConfig(url="mqtt://[::1]:1883"),
                    MqttConfig(url="mqtt://localhost:1883"),
                    MqttConfig(url=REMOTE_PLAIN, allow_plaintext_credentials=True)):
            got = load_credentials(cfg, env)
            assert got is not None
            assert got.password == "hunter2-XYZZY"


def test_the_node_refuses_plain_mqtt_credentials_before_connecting(tmp_path: Path) -> None:
    """The publisher stops at construction (nothing connected yet) with the config error."""
    env = _credential_sources(tmp_path)[0]
    with pytest.raises(ConfigError, match=r"mqtt\.url.*clear text"):
        VerdictPublisher(MqttConfig(url=REMOTE_PLAIN), NodeConfig(), tmp_path / "outbox.db",
                         WallClock(), lambda _a: None, lambda _f: None, environ=env)
    assert not (tmp_path / "outbox.db").exists()


def _read_packet(conn: socket.socket) -> tuple[int, bytes]:
    """One MQTT packet: (first header byte, body)."""
    header = conn.recv(1)
    if not header:
        raise ConnectionError("closed")
    length, shift = 0, 0
    while True:
        byte = conn.recv(1)[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    body = b""
    while len(body) < length:
        chunk = conn.recv(length - len(body))
        if not chunk:
            raise ConnectionError("closed")
        body += chunk
    return header[0], body


def _serve_311(conn: socket.socket, levels: list[int]) -> None:
    """Refuse MQTT 5 like a 3.1.1 broker (CONNACK code 1); speak enough 3.1.1 otherwise."""
    _, body = _read_packet(conn)
    level = body[6]  # "\0\4MQTT" then the protocol level
    levels.append(level)
    if level == 5:
        conn.sendall(b"\x20\x02\x00\x01")
        conn.close()
        return
    conn.sendall(b"\x20\x02\x00\x00")
    while True:
        kind, body = _read_packet(conn)
        if kind & 0xF0 == 0x80:  # SUBSCRIBE -> SUBACK granting QoS 1 to each filter
            pos, n = 2, 0
            while pos < len(body):
                pos += 2 + int.from_bytes(body[pos:pos + 2], "big") + 1
                n += 1
            conn.sendall(bytes([0x90, 2 + n]) + body[:2] + b"\x01" * n)
        elif kind & 0xF0 == 0x30 and kind & 0x06:  # PUBLISH QoS 1 -> PUBACK
            topic_len = int.from_bytes(body[:2], "big")
            conn.sendall(b"\x40\x02" + body[2 + topic_len:4 + topic_len])
        elif kind & 0xF0 == 0xC0:  # PINGREQ
            conn.sendall(b"\xd0\x00")


@pytest.fixture
def mqtt311_only_broker() -> Iterator[tuple[int, list[int]]]:
    """A fake MQTT 3.1.1-only broker: refuses a v5 CONNECT the way old brokers do (CONNACK
    return code 1) and accepts a 3.1.1 one. Yields its port and the protocol levels seen."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    server.settimeout(0.2)
    levels: list[int] = []
    stop = threading.Event()
    conns: list[socket.socket] = []

    def accept_loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conns.append(conn)
            threading.Thread(target=_quietly, args=(conn, levels), name="fake-conn",
                             daemon=True).start()

    thread = threading.Thread(target=accept_loop, name="fake-broker", daemon=True)
    thread.start()
    yield port, levels
    stop.set()
    thread.join(2)
    for c in conns:
        c.close()
    server.close()


def _quietly(conn: socket.socket, levels: list[int]) -> None:
    with contextlib.suppress(ConnectionError, OSError, IndexError):  # the client hung up
        _serve_311(conn, levels)


def test_falls_back_to_mqtt311_when_broker_refuses_v5(
        mqtt311_only_broker: tuple[int, list[int]],
        node_factory: Callable[..., NodeSide]) -> None:
    """With protocol 'auto' a broker that refuses MQTT 5 gets a 3.1.1 connection instead."""
    port, levels = mqtt311_only_broker
    node = node_factory(f"mqtt://127.0.0.1:{port}")
    assert node.publisher.connected
    assert node.publisher.metrics().protocol == "3.1.1"
    assert levels[:2] == [5, 4]


def test_no_fallback_when_v5_is_required(
        mqtt311_only_broker: tuple[int, list[int]],
        node_factory: Callable[..., NodeSide]) -> None:
    """With protocol '5' the refusal stands: not connected, and the reason is reported."""
    port, _ = mqtt311_only_broker
    node = node_factory(f"mqtt://127.0.0.1:{port}",
                        mqtt=MqttConfig(url=f"mqtt://127.0.0.1:{port}", protocol="5"),
                        connect=False)
    assert not node.publisher.wait_connected(0.5)
    assert "Unsupported protocol version" in (node.publisher.last_error or "")
