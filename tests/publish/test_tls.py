"""TLS against a real mosquitto: CA and client certificates made by the test."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge.config import ConfigError, MqttConfig, TlsConfig, config_from_mapping
from edge.publish.broker import BrokerTls, MosquittoBroker
from edge.publish.connection import BrokerConfigError, tls_context
from tests.publish.helpers import make_verdict, wait_until

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from tests.publish.conftest import NodeSide


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


class Authority:
    """A throwaway certificate authority."""

    def __init__(self, directory: Path, name: str) -> None:
        self.dir = directory
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
        now = dt.datetime.now(dt.timezone.utc)
        self.cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256()))
        self.path = directory / f"{name}-ca.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, cn: str, *, server: bool) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        out = Issued(self.dir / f"{self.name}-{cn}.pem", self.dir / f"{self.name}-{cn}.key")
        out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        return out


@pytest.fixture
def ca(tmp_path: Path) -> Authority:
    """The CA the node trusts (signs the broker and the node's client certificate)."""
    return Authority(tmp_path, "plant")


def test_node_connects_with_ca_and_client_certificate(
        ca: Authority, mosquitto_factory: Callable[..., MosquittoBroker],
        node_factory: Callable[..., NodeSide]) -> None:
    """Over mqtts:// the node verifies the broker against its CA file, presents its client
    certificate (the broker requires one) and its verdicts are acknowledged."""
    server = ca.issue("broker", server=True)
    client = ca.issue("edge-01", server=False)
    broker = mosquitto_factory(tls=BrokerTls(ca.path, server.cert, server.key))
    assert broker.url.startswith("mqtts://")
    cfg = MqttConfig(url=broker.url, tls=TlsConfig(ca_file=ca.path, cert_file=client.cert,
                                                   key_file=client.key))
    node = node_factory(broker, mqtt=cfg)
    node.publisher.publish_verdict(make_verdict("over-tls"))
    assert wait_until(lambda: len(node.acked) == 1, 5)


def test_node_refuses_broker_certificate_from_another_ca(
        tmp_path: Path, ca: Authority, mosquitto_factory: Callable[..., MosquittoBroker],
        node_factory: Callable[..., NodeSide]) -> None:
    """A broker whose certificate another CA signed is refused: the node stays disconnected
    and says why (certificate verify failed, check mqtt.tls.ca_file)."""
    rogue = Authority(tmp_path, "rogue")
    server = rogue.issue("broker", server=True)
    client = ca.issue("edge-01", server=False)
    broker = mosquitto_factory(tls=BrokerTls(ca.path, server.cert, server.key))
    cfg = MqttConfig(url=broker.url, tls=TlsConfig(ca_file=ca.path, cert_file=client.cert,
                                                   key_file=client.key))
    node = node_factory(broker, mqtt=cfg, connect=False)
    assert not node.publisher.wait_connected(1.0)
    error = node.publisher.last_error or ""
    assert "certificate verify failed" in error
    assert "mqtt.tls.ca_file" in error
    assert node.publisher.metrics().connect_failures >= 1


def test_broker_requiring_client_certificate_rejects_node_without_one(
        ca: Authority, mosquitto_factory: Callable[..., MosquittoBroker],
        node_factory: Callable[..., NodeSide]) -> None:
    """Without a client certificate the TLS handshake fails and the node is not connected."""
    server = ca.issue("broker", server=True)
    broker = mosquitto_factory(tls=BrokerTls(ca.path, server.cert, server.key))
    node = node_factory(broker, mqtt=MqttConfig(url=broker.url, tls=TlsConfig(ca_file=ca.path)),
                        connect=False)
    assert not node.publisher.wait_connected(1.0)
    assert node.publisher.last_error


def test_unreadable_tls_files_are_a_config_error(tmp_path: Path) -> None:
    """A CA file that is not a certificate is reported as a broker config error up front."""
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    with pytest.raises(BrokerConfigError, match=r"mqtt\.tls"):
        tls_context(TlsConfig(ca_file=bad))


@pytest.mark.parametrize("key", ["ca_file", "cert_file", "key_file"])
def test_tls_settings_with_a_plain_mqtt_url_are_refused(ca: Authority, key: str) -> None:
    """mqtt.tls.* with an mqtt:// URL stops the node at load, naming the key; they used to be
    ignored silently and the connection left unencrypted."""
    with pytest.raises(ConfigError) as err:
        config_from_mapping({"mqtt": {"url": "mqtt://broker.site.example:1883",
                                      "tls": {key: str(ca.path)}}})
    assert err.value.path == f"mqtt.tls.{key}"
    assert "mqtts://" in str(err.value)
    cfg = config_from_mapping({"mqtt": {"url": "mqtts://broker.site.example:8883",
                                        "tls": {key: str(ca.path)}}})
    assert getattr(cfg.mqtt.tls, key) == ca.path
