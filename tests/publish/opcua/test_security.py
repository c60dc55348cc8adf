"""Who gets in: Basic256Sha256 endpoints, users and passwords, trusted client certificates."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from asyncua.ua.uaerrors import UaError

from edge.config import NodeConfig, OpcUaConfig
from edge.publish.broker import free_port
from edge.publish.opcua.certs import CertFiles, write_certificates
from edge.publish.opcua.security import Users
from tests.publish.opcua.helpers import ClientCert, Served, client_cert, connected, read, serve


@dataclass
class Secure:
    served: Served
    files: CertFiles
    trusted: ClientCert
    untrusted: ClientCert


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    """A server with Sign and SignAndEncrypt endpoints, one user, one trusted client."""
    root = tmp_path_factory.mktemp("opcua-pki")
    files = write_certificates(root / "server", NodeConfig(), ["localhost", "127.0.0.1"])
    cfg = OpcUaConfig(enabled=True, port=free_port(), cert_file=files.cert,
                      key_file=files.key, trusted_dir=files.trusted)
    served = serve(cfg, Users({"plc": "s3cret"}, "test"))
    yield Secure(served, files, client_cert(root / "clients", "plc", files.trusted),
                 client_cert(root / "clients", "stranger"))
    served.channel.stop(2.0)


async def _seq(secure: Secure, cert: ClientCert, user: str | None, password: str | None,
               mode: ua.MessageSecurityMode = ua.MessageSecurityMode.SignAndEncrypt) -> int:
    async with connected(secure.served.url, user=user, password=password, cert=cert,
                         server_cert=secure.files.cert, mode=mode) as (client, idx):
        return int(await read(client, idx, "PLC.Seq"))


def test_a_trusted_client_with_user_and_password_reads_the_block(secure: Secure) -> None:
    """SignAndEncrypt and Sign both let a trusted client with a valid user in."""
    assert asyncio.run(_seq(secure, secure.trusted, "plc", "s3cret")) == 0
    assert asyncio.run(_seq(secure, secure.trusted, "plc", "s3cret",
                            ua.MessageSecurityMode.Sign)) == 0


def test_a_wrong_password_an_unknown_user_and_anonymous_are_refused(secure: Secure) -> None:
    """No session without a known user and its password (anonymous is off by default)."""
    refused = secure.served.channel.stats.logins_refused
    for user, password in (("plc", "wrong"), ("intruder", "s3cret"), (None, None)):
        with pytest.raises(UaError) as err:
            asyncio.run(_seq(secure, secure.trusted, user, password))
        assert "BadUserAccessDenied" in repr(err.value) or "BadIdentityToken" in repr(err.value)
    assert secure.served.channel.stats.logins_refused >= refused + 2


def test_an_untrusted_client_certificate_is_refused_and_kept_for_review(secure: Secure) -> None:
    """A client whose certificate is not in the trusted folder gets BadCertificateUntrusted
    on SignAndEncrypt, even with the right password; its certificate lands in rejected/,
    and once an operator moves it to trusted/ the next connection gets in."""
    refused = secure.served.channel.stats.certificates_refused
    with pytest.raises(ua.UaStatusCodeError) as err:
        asyncio.run(_seq(secure, secure.untrusted, "plc", "s3cret"))
    assert err.value.code == ua.StatusCodes.BadCertificateUntrusted
    assert secure.served.channel.stats.certificates_refused == refused + 1
    kept = list(secure.files.rejected.glob("*.der"))
    assert [p.read_bytes() for p in kept] == [secure.untrusted.cert.read_bytes()]
    shutil.move(str(kept[0]), secure.files.trusted / kept[0].name)
    assert asyncio.run(_seq(secure, secure.untrusted, "plc", "s3cret")) == 0


def test_a_secure_server_offers_no_unencrypted_endpoint(secure: Secure) -> None:
    """A secure server offers only its Sign and SignAndEncrypt endpoints: a client that
    wants no security finds none."""
    async def plain() -> None:
        async with connected(secure.served.url, user="plc", password="s3cret"):
            pass

    with pytest.raises(UaError, match="No matching endpoints"):
        asyncio.run(plain())

    async def endpoints() -> list[ua.EndpointDescription]:
        return await Client(secure.served.url).connect_and_get_server_endpoints()

    modes = {e.SecurityMode for e in asyncio.run(endpoints())}
    assert modes == {ua.MessageSecurityMode.Sign, ua.MessageSecurityMode.SignAndEncrypt}


def test_the_certs_command_writes_a_certificate_for_this_node(tmp_path: Path) -> None:
    """`edge-node opcua certs` writes a certificate naming the node's application URI and
    the hosts, a key only its owner reads, and the trust folders; it never overwrites."""
    from cryptography import x509

    from edge.commands.main import main

    out = tmp_path / "opcua"
    assert main(["opcua", "certs", "--out", str(out), "--host", "plc-gw.example",
                 "--host", "10.0.0.7"]) == 0
    cert = x509.load_der_x509_certificate((out / "server-cert.der").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "urn:conveyor-vision:line-1:edge-01"]
    assert san.get_values_for_type(x509.DNSName) == ["plc-gw.example"]
    assert (out / "server-key.pem").stat().st_mode & 0o077 == 0
    assert (out / "trusted").is_dir()
    assert (out / "rejected").is_dir()
    assert main(["opcua", "certs", "--out", str(out)]) == 1


def test_no_session_runs_on_an_unsecured_channel(secure: Secure) -> None:
    """asyncua opens an unsecured channel to anyone (for discovery) and would let a session
    run on it; the node refuses the session, even with a valid user and password."""

    async def run() -> None:
        client = Client(secure.served.url, timeout=5)
        await client.connect_socket()
        try:
            await client.send_hello()
            await client.open_secure_channel()
            params = ua.CreateSessionParameters(
                ClientDescription=ua.ApplicationDescription(
                    ApplicationUri="urn:x", ApplicationType=ua.ApplicationType.Client),
                EndpointUrl=secure.served.url, SessionName="plain", ClientNonce=b"n" * 32,
                RequestedSessionTimeout=60_000)
            await client.uaclient.create_session(params)  # what asyncua lets through
            token = ua.UserNameIdentityToken(PolicyId="username", UserName="plc",
                                             Password=b"s3cret")
            with pytest.raises(ua.UaStatusCodeError) as err:
                await client.uaclient.activate_session(
                    ua.ActivateSessionParameters(UserIdentityToken=token))
            assert err.value.code == ua.StatusCodes.BadUserAccessDenied
        finally:
            client.disconnect_socket()

    asyncio.run(run())


def test_a_channel_secured_with_an_untrusted_certificate_gets_no_session(
        secure: Secure, tmp_path: Path) -> None:
    """Naming a trusted client's (public) certificate in CreateSession does not help a
    client whose channel is secured with its own untrusted one."""
    impostor = client_cert(tmp_path, "impostor")

    async def run() -> None:
        client = Client(secure.served.url, timeout=5)
        client.application_uri = secure.trusted.app_uri
        await client.set_security(SecurityPolicyBasic256Sha256,
                                  certificate=str(impostor.cert),
                                  private_key=str(impostor.key),
                                  server_certificate=str(secure.files.cert),
                                  mode=ua.MessageSecurityMode.SignAndEncrypt)
        await client.connect_socket()
        try:
            await client.send_hello()
            await client.open_secure_channel()
            params = ua.CreateSessionParameters(  # naming the trusted client's certificate
                ClientDescription=ua.ApplicationDescription(
                    ApplicationUri=secure.trusted.app_uri,
                    ApplicationType=ua.ApplicationType.Client),
                EndpointUrl=secure.served.url, SessionName="borrowed", ClientNonce=b"n" * 32,
                ClientCertificate=secure.trusted.cert.read_bytes(),
                RequestedSessionTimeout=60_000)
            created = await client.uaclient.create_session(params)  # passes the CA check
            policy = client.security_policy  # signed with the channel's own (untrusted) key
            signature = ua.SignatureData(
                Algorithm=policy.AsymmetricSignatureURI,
                Signature=policy.asymmetric_cryptography.signature(
                    secure.files.cert.read_bytes() + created.ServerNonce))
            token = ua.UserNameIdentityToken(PolicyId="username", UserName="plc",
                                             Password=b"s3cret")
            with pytest.raises(ua.UaStatusCodeError) as err:
                await client.uaclient.activate_session(ua.ActivateSessionParameters(
                    ClientSignature=signature, UserIdentityToken=token))
            assert err.value.code == ua.StatusCodes.BadUserAccessDenied
        finally:
            client.disconnect_socket()

    asyncio.run(run())


def test_a_sniffed_session_token_cannot_take_the_session_over_an_unsecured_channel(
        secure: Secure) -> None:
    """A signed-only channel shows the session's authentication token to a sniffer; a client
    on an unsecured channel re-activating the PLC's session with it is refused before the
    session is bound to its connection, and the PLC's session goes on working."""

    async def run() -> None:
        async with connected(secure.served.url, user="plc", password="s3cret",
                             cert=secure.trusted, server_cert=secure.files.cert,
                             mode=ua.MessageSecurityMode.Sign) as (plc, idx):
            stolen = plc.uaclient.protocol.authentication_token
            thief = Client(secure.served.url, timeout=5)
            await thief.connect_socket()
            try:
                await thief.send_hello()
                await thief.open_secure_channel()
                thief.uaclient.protocol.authentication_token = stolen
                anonymous = ua.AnonymousIdentityToken(PolicyId="anonymous")
                with pytest.raises(ua.UaStatusCodeError) as err:
                    await thief.uaclient.activate_session(
                        ua.ActivateSessionParameters(UserIdentityToken=anonymous))
                assert err.value.code == ua.StatusCodes.BadSecurityChecksFailed
                with pytest.raises(ua.UaStatusCodeError):
                    await thief.get_node(ua.NodeId(ua.ObjectIds.Server_ServerStatus)).read_value()
            finally:
                thief.disconnect_socket()
            assert int(await read(plc, idx, "PLC.Seq")) >= 0

    asyncio.run(run())
