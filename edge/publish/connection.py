"""Where and how to reach the broker: URL, credentials, TLS.

Credentials never come from the YAML itself. In order of precedence:
``mqtt.credentials_file`` (one line ``username:password``), the environment
(``CV_MQTT_USERNAME`` / ``CV_MQTT_PASSWORD``), or the systemd credential
``$CREDENTIALS_DIRECTORY/mqtt`` (``LoadCredential=mqtt:/etc/…``). The password
is never logged: `Credentials` hides it from ``repr``. Credentials are refused
(`ConfigError`) over a plain ``mqtt://`` URL to a broker beyond loopback unless
``mqtt.allow_plaintext_credentials`` (`edge.config.check_mqtt_credentials`).
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from edge.config import check_mqtt_credentials

if TYPE_CHECKING:
    from collections.abc import Mapping

    from edge.config import MqttConfig, TlsConfig

ENV_USERNAME = "CV_MQTT_USERNAME"
ENV_PASSWORD = "CV_MQTT_PASSWORD"
SYSTEMD_CREDENTIAL = "mqtt"


class BrokerConfigError(ValueError):
    """Broker settings that cannot work (bad URL, unreadable credentials or TLS files)."""


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str = field(repr=False)
    source: str = "?"

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password=***, source={self.source!r})"


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool


def parse_url(url: str) -> BrokerAddress:
    """``mqtt://host[:1883]`` or ``mqtts://host[:8883]``."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise BrokerConfigError(f"mqtt.url {url!r}: expected mqtt://HOST:PORT or mqtts://HOST:PORT")
    if parts.username or parts.password:
        raise BrokerConfigError("mqtt.url: credentials do not belong in the URL; use "
                                "mqtt.credentials_file or the environment")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise BrokerConfigError(f"mqtt.url {url!r}: bad port") from None
    return BrokerAddress(parts.hostname, port, tls)


def _parse_line(text: str, source: str) -> Credentials:
    line = text.strip().splitlines()[0] if text.strip() else ""
    user, sep, password = line.partition(":")
    if not sep or not user:
        raise BrokerConfigError(f"MQTT credentials from {source}: expected one line "
                                "'username:password'")
    return Credentials(user, password, source)


def load_credentials(cfg: MqttConfig, environ: Mapping[str, str] | None = None
                     ) -> Credentials | None:
    """The broker credentials, or None for an anonymous connection.

    Raises `ConfigError` (before any connection) when credentials would cross the network
    in clear text: a plain mqtt:// URL beyond loopback without
    ``mqtt.allow_plaintext_credentials``. Only here are both the URL and the credentials
    from the environment or the systemd credential known.
    """
    credentials = _find_credentials(cfg, os.environ if environ is None else environ)
    if credentials is not None:
        check_mqtt_credentials(cfg, credentials.source)
    return credentials


def _find_credentials(cfg: MqttConfig, env: Mapping[str, str]) -> Credentials | None:
    if cfg.credentials_file is not None:
        try:
            text = Path(cfg.credentials_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise BrokerConfigError(f"mqtt.credentials_file {cfg.credentials_file}: "
                                    f"cannot read ({exc.strerror})") from None
        return _parse_line(text, f"file {cfg.credentials_file}")
    if env.get(ENV_USERNAME):
        return Credentials(env[ENV_USERNAME], env.get(ENV_PASSWORD, ""),
                           f"environment ${ENV_USERNAME}")
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    if cred_dir:
        path = Path(cred_dir) / SYSTEMD_CREDENTIAL
        if path.is_file():
            return _parse_line(path.read_text(encoding="utf-8"), "systemd credential 'mqtt'")
    return None


def tls_context(tls: TlsConfig) -> ssl.SSLContext:
    """A client context that verifies the broker (and its host name) against `ca_file`."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if tls.ca_file is not None:
            ctx.load_verify_locations(cafile=str(tls.ca_file))
        if tls.cert_file is not None:
            ctx.load_cert_chain(str(tls.cert_file),
                                str(tls.key_file) if tls.key_file is not None else None)
        elif tls.key_file is not None:
            raise BrokerConfigError("mqtt.tls.key_file is set without mqtt.tls.cert_file")
    except (OSError, ssl.SSLError) as exc:
        raise BrokerConfigError(f"mqtt.tls: cannot load the CA or client certificate: {exc}"
                                ) from None
    return ctx


def describe_connect_error(exc: BaseException, cfg: MqttConfig) -> str:
    """A message an operator can act on, for an exception raised while connecting."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        ca = cfg.tls.ca_file or "the system CA store"
        return (f"TLS: certificate verify failed: refused the broker's certificate "
                f"({exc.verify_message}); it is not "
                f"signed by mqtt.tls.ca_file ({ca}) or does not name the host in mqtt.url")
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc.reason or exc}); check the broker's TLS listener"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused: no broker listening at mqtt.url"
    if isinstance(exc, OSError):
        return f"cannot reach the broker: {exc.strerror or exc}"
    return f"cannot connect: {exc}"
