"""Which client certificates the OPC UA server trusts: those in a folder, or issued by a CA
certificate there. The folder is read again when it changes, so a certificate copied in is
trusted from the next connection; one refused is kept in `rejected/` (when that folder
exists) for an operator to move into the trusted folder."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import structlog
from asyncua import ua
from asyncua.common.utils import ServiceError
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification

log = structlog.get_logger(__name__)

#: Refused client certificates kept for review, at most.
MAX_REJECTED_KEPT = 100


def thumbprint(cert: x509.Certificate) -> bytes:
    # OPC UA names certificates by their SHA-1 thumbprint (an identifier, not a signature).
    return hashlib.sha1(cert.public_bytes(serialization.Encoding.DER),
                        usedforsecurity=False).digest()


def _load(path: Path) -> x509.Certificate:
    data = path.read_bytes()
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _require_ca(_policy: verification.Policy, _cert: x509.Certificate,
                ext: x509.BasicConstraints | None) -> None:
    if ext is None or not ext.ca:
        raise ValueError("an issuer must be a CA")


class TrustFolder:
    def __init__(self, folder: Path, rejected: Path | None = None,
                 on_refused: Callable[[str], None] | None = None) -> None:
        self.folder = folder
        self.rejected = rejected
        self._on_refused = on_refused
        self._signature: tuple[tuple[str, int], ...] | None = None
        self._thumbprints: frozenset[bytes] = frozenset()
        self._cas: verification.Store | None = None
        self._basic = CertificateValidator(CertificateValidatorOptions.TIME_RANGE
                                           | CertificateValidatorOptions.URI)

    def _reload_if_changed(self) -> None:
        try:
            files = sorted(p for p in self.folder.iterdir() if p.is_file())
            signature = tuple((p.name, p.stat().st_mtime_ns) for p in files)
        except OSError as exc:  # the folder went away: trust nobody new, say why
            log.warning("opcua_trusted_folder_unreadable", folder=str(self.folder),
                        error=str(exc))
            return
        if signature == self._signature:
            return
        certs = []
        for path in files:
            try:
                certs.append(_load(path))
            except (OSError, ValueError) as exc:
                log.warning("opcua_trusted_certificate_unreadable", file=str(path),
                            error=str(exc))
        self._thumbprints = frozenset(thumbprint(c) for c in certs)
        cas = [c for c in certs if _is_ca(c)]
        self._cas = verification.Store(cas) if cas else None
        self._signature = signature

    def trusts(self, cert: x509.Certificate) -> bool:
        """In the folder, or issued by a CA there (and valid now)."""
        self._reload_if_changed()
        if thumbprint(cert) in self._thumbprints:
            return True
        if self._cas is None:
            return False
        verifier = (verification.PolicyBuilder().store(self._cas).extension_policies(
            ca_policy=verification.ExtensionPolicy.permit_all().require_present(
                x509.BasicConstraints, verification.Criticality.AGNOSTIC, _require_ca),
            ee_policy=verification.ExtensionPolicy.permit_all()).build_client_verifier())
        try:
            verifier.verify(cert, [])
        except (verification.VerificationError, ValueError):
            return False
        return True

    def channel_refusal(self, peer_certificate: bytes | None, allow_unsecured: bool
                        ) -> str | None:
        """Why no session may run on a channel secured with `peer_certificate` (empty: an
        unsecured one), or None when one may."""
        if not peer_certificate:  # None or b"": asyncua's unsecured channel
            return None if allow_unsecured else "unsecured_channel"
        try:
            cert = x509.load_der_x509_certificate(peer_certificate)
        except ValueError:
            return "unreadable_certificate"
        if self.trusts(cert):
            return None
        self._keep_rejected(cert)
        return "untrusted_certificate"

    async def __call__(self, cert: x509.Certificate,
                       app_description: ua.ApplicationDescription) -> None:
        """asyncua's CreateSession check of the certificate the client names: valid now,
        naming the client's application URI, trusted."""
        try:
            await self._basic.validate(cert, app_description)
            if not self.trusts(cert):
                raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)
        except ServiceError as exc:
            why = ua.StatusCode(ua.UInt32(exc.code)).name
            log.warning("opcua_client_certificate_refused", why=why,
                        subject=cert.subject.rfc4514_string(),
                        application_uri=app_description.ApplicationUri)
            self._keep_rejected(cert)
            if self._on_refused is not None:
                self._on_refused(why)
            raise

    def _keep_rejected(self, cert: x509.Certificate) -> None:
        if self.rejected is None or not self.rejected.is_dir():
            return
        target = self.rejected / f"{thumbprint(cert).hex()}.der"
        try:
            if not target.exists() and len(list(self.rejected.iterdir())) < MAX_REJECTED_KEPT:
                target.write_bytes(cert.public_bytes(serialization.Encoding.DER))
        except OSError as exc:
            log.warning("opcua_rejected_certificate_not_kept", error=str(exc))
