"""The sections of the node's links beyond its own line: the broker (`mqtt`), OPC UA for
PLCs, Sparkplug B for SCADA and the site's other nodes (`site`).

Part of `edge.config`, which imports and re-exports every name here (import them from
there); kept apart so that `edge/config.py` stays readable. The broker's sections live here
too, as Sparkplug B's names one of its own.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edge.config_schema import ConfigError, setting


def is_loopback(host: str) -> bool:
    """Whether an address or host name (an HTTP bind, a broker's host) is this machine only:
    127.0.0.0/8, ::1 or localhost."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class TlsConfig:
    ca_file: Path | None = setting(
        None, doc="CA bundle that signed the broker", path_must_exist=True)
    cert_file: Path | None = setting(None, doc="client certificate", path_must_exist=True)
    key_file: Path | None = setting(None, doc="client key", path_must_exist=True)


@dataclass(frozen=True, slots=True)
class MqttConfig:
    url: str | tuple[str, ...] = setting(
        "mqtt://127.0.0.1:1883", doc="broker URL: mqtt://HOST:PORT or mqtts://; or a list of "
        "them, one scheme: the node connects to the first that answers and moves to the next "
        "when one goes away")
    topic_prefix: str = setting("conveyor-vision", doc="root of the topic tree")
    client_id: str | None = setting(None, doc="default: cv-<node_id>")
    credentials_file: Path | None = setting(
        None, doc="file with 'username:password'; or $CV_MQTT_USERNAME/$CV_MQTT_PASSWORD, or "
        "the systemd credential 'mqtt'", path_must_exist=True)
    tls: TlsConfig = setting(factory=TlsConfig, doc="TLS settings (mqtts:// only; with mqtt:// "
                             "they are refused)")
    allow_plaintext_credentials: bool = setting(
        False, doc="send credentials over a plain mqtt:// URL to a broker beyond loopback (the "
        "password crosses the network in clear text); false: refused")
    keepalive_s: int = setting(10, lo=1, hi=3600, doc="MQTT keepalive")
    protocol: Literal["auto", "5", "3.1.1"] = setting("auto", doc="MQTT protocol version")
    status_interval_s: float = setting(30.0, lo=0.1, hi=3600.0,
                                  doc="re-publish the retained status with fresh health this often")

    @property
    def urls(self) -> tuple[str, ...]:
        """Every broker URL, in the order they are tried."""
        return (self.url,) if isinstance(self.url, str) else self.url


@dataclass(frozen=True, slots=True)
class SparkplugConfig:
    enabled: bool = setting(False, doc="also publish verdicts and health as a Sparkplug B edge "
                            "node, for SCADA (docs/sparkplug.md)")
    group_id: str = setting("conveyor-vision", doc="Sparkplug group ID: spBv1.0/<group_id>/...")
    edge_node_id: str | None = setting(None, doc="Sparkplug edge node ID; default: node.node_id")
    client_id: str | None = setting(None, doc="MQTT client ID; default: cv-spb-<edge_node_id>")
    broker: MqttConfig | None = setting(
        None, doc="the broker, with the keys of mqtt: (URL, TLS, credentials); default: the "
        "node's mqtt settings")
    queue_size: int = setting(1024, lo=1, hi=1_000_000, doc="verdicts waiting for the broker; "
                              "more are dropped (counted in Node/verdicts_dropped)")
    health_interval_s: float = setting(1.0, lo=0.05, hi=3600.0,
                                       doc="read the node's health and cameras this often")


@dataclass(frozen=True, slots=True)
class OpcUaConfig:
    enabled: bool = setting(False, doc="serve verdicts to PLCs over OPC UA (docs/opcua.md)")
    bind: str = setting("127.0.0.1", doc="address to listen on")
    port: int = setting(4840, lo=1, hi=65535, doc="TCP port")
    security: tuple[Literal["none", "sign", "sign_and_encrypt"], ...] = setting(
        ("sign", "sign_and_encrypt"), doc="endpoints (Basic256Sha256); none: loopback only")
    cert_file: Path | None = setting(None, doc="server certificate (edge-node opcua certs)",
                                     path_must_exist=True)
    key_file: Path | None = setting(None, doc="its private key", path_must_exist=True)
    trusted_dir: Path | None = setting(None, doc="folder of trusted client certificates "
                                       "(or their CAs)", path_must_exist=True)
    credentials_file: Path | None = setting(None, doc="'user:password' lines; default: the "
                                            "systemd credential 'opcua'", path_must_exist=True)
    allow_anonymous: bool = setting(False, doc="let clients in without a user name")
    namespace_uri: str = setting("urn:conveyor-vision:vision", doc="namespace of the nodes")
    results_kept: int = setting(100, lo=1, hi=10_000, doc="results kept by item ID")
    handshake: bool = setting(True, doc="hold each result in the PLC block until ResultAck or "
                              "its divert deadline; false: show each result as it comes")
    ack_timeout_ms: float | None = setting(None, lo=1.0, doc="stop waiting for ResultAck this "
                                           "long after a result is shown; null: its deadline")
    queue_size: int = setting(256, lo=1, hi=100_000, doc="verdicts waiting for the server "
                              "thread; more are dropped and counted")
    max_clients: int = setting(20, lo=1, hi=1000, doc="TCP connections accepted at once")
    connects_per_s: float = setting(20.0, lo=0.1, hi=1000.0, doc="new connections accepted "
                                    "a second (bursts of 20); more are closed at once, so that "
                                    "clients reconnecting in a loop cannot starve the node")

    def __post_init__(self) -> None:
        secure = [m for m in self.security if m != "none"]
        if self.enabled and not self.security:
            raise ConfigError("opcua.security", [], "at least one of none, sign, sign_and_encrypt")
        if self.enabled and len(secure) < len(self.security) and not is_loopback(self.bind):
            raise ConfigError("opcua.security", list(self.security), "no 'none' unless "
                              "opcua.bind is a loopback address (it sends everything in clear)")
        for key in ("cert_file", "key_file", "trusted_dir"):
            if self.enabled and secure and getattr(self, key) is None:
                raise ConfigError(f"opcua.{key}", None, f"a path, as opcua.security has {secure}")


@dataclass(frozen=True, slots=True)
class SiteConfig:
    site_id: str = setting("site", doc="the site whose nodes share what they learn through the "
                           "broker: the topic level {prefix}/site/{site_id}/")
    share_gallery: bool = setting(
        False, doc="publish the reference views this node learns from packaging_changed "
        "feedback to the site's other nodes, and learn theirs (docs/mqtt.md#shared-gallery)")
    allowed_nodes: tuple[str, ...] = setting(
        factory=tuple, doc="node IDs whose shared views this node accepts; empty: none")
    max_message_kb: int = setting(
        1024, lo=16, hi=65536, doc="largest shared-gallery message accepted or sent; a node "
        "leaves its oldest views out of its own to stay under it")

    def __post_init__(self) -> None:
        # Each is a topic level or compared with one.
        named = [("site_id", self.site_id)]
        named += [(f"allowed_nodes[{i}]", n) for i, n in enumerate(self.allowed_nodes)]
        for key, value in named:
            if any(ch in value for ch in "/#+ "):
                raise ConfigError(f"site.{key}", value, "no '/', '#', '+' or spaces")
