"""The server's application instance certificate (`edge-node opcua certs`), self-signed.

OPC UA clients check that the certificate names the server's application URI (a URI in the
subject alternative name) and, many of them, the host they connect to: every name and
address the PLCs use belongs in `hosts`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge.config import NodeConfig

#: The file names `write_certificates` uses in its folder.
CERT_NAME = "server-cert.der"
KEY_NAME = "server-key.pem"
TRUSTED_NAME = "trusted"
REJECTED_NAME = "rejected"


def application_uri(node: NodeConfig) -> str:
    """The server's application URI: one per node, named in its certificate."""
    return f"urn:conveyor-vision:{node.line_id}:{node.node_id}"


def default_hosts() -> list[str]:
    return [socket.gethostname(), "localhost", "127.0.0.1"]


def _alt_names(app_uri: str, hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(app_uri)]
    for host in dict.fromkeys(hosts):  # once each, in order
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_certificate(app_uri: str, hosts: Sequence[str], *, common_name: str,
                     days: int = 5 * 365, key_bits: int = 2048,
                     client: bool = False) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """A self-signed RSA certificate for Basic256Sha256 (2048-bit key, SHA-256), usable by
    a server (and, with `client`, by a client: the tests' and tools' clients)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=key_bits)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "conveyor-vision")])
    now = dt.datetime.now(dt.timezone.utc)
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    if client:
        usages.reverse()
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # clocks a little behind still accept
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_alt_names(app_uri, hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=True, key_encipherment=True,
            data_encipherment=True, key_agreement=False, key_cert_sign=True, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass(frozen=True, slots=True)
class CertFiles:
    cert: Path
    key: Path
    trusted: Path
    rejected: Path


def write_certificates(out: Path, node: NodeConfig, hosts: Sequence[str], *,
                       days: int = 5 * 365, force: bool = False) -> CertFiles:
    """The server certificate (DER) and key (PEM, readable by its owner only) in `out`, with
    the empty `trusted/` and `rejected/` folders beside them. FileExistsError when a
    certificate is there already, unless `force`."""
    files = CertFiles(out / CERT_NAME, out / KEY_NAME, out / TRUSTED_NAME, out / REJECTED_NAME)
    if not force and (files.cert.exists() or files.key.exists()):
        raise FileExistsError(f"{files.cert} or {files.key} exists (--force replaces them)")
    out.mkdir(parents=True, exist_ok=True)
    files.trusted.mkdir(exist_ok=True)
    files.rejected.mkdir(exist_ok=True)
    cert, key = make_certificate(application_uri(node), hosts, days=days,
                                 common_name=f"conveyor-vision {node.node_id}")
    fd = os.open(files.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem(key))
    os.chmod(files.key, 0o600)  # also when --force replaced a file with other modes
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    return files
