"""Who may talk to the OPC UA server: endpoints, users, trusted client certificates.

Users and passwords never come from the YAML: `opcua.credentials_file`, or the systemd
credential ``$CREDENTIALS_DIRECTORY/opcua`` (``LoadCredential=opcua:/etc/…``), one
``user:password`` a line. Nobody is an administrator: every session may read, call
GetResultByItemId and write ResultAck, and asyncua's access levels refuse every other write.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from asyncua import ua
from asyncua.common.utils import ServiceError
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.uaprocessor import UaProcessor
from asyncua.server.user_managers import UserManager

from edge.config import ConfigError, OpcUaConfig

if TYPE_CHECKING:
    from asyncua.server.internal_server import InternalServer

log = structlog.get_logger(__name__)

SYSTEMD_CREDENTIAL = "opcua"

POLICIES: Mapping[str, ua.SecurityPolicyType] = {
    "none": ua.SecurityPolicyType.NoSecurity,
    "sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
    "sign_and_encrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
}


@dataclass(frozen=True, slots=True)
class Users:
    """User names and passwords (never in a repr or a log line)."""

    passwords: Mapping[str, str] = field(repr=False, default_factory=dict)
    source: str = "none"


def _parse_users(text: str, source: str) -> Users:
    passwords: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise ConfigError(f"opcua users ({source}) line {number}", "***",
                              "'user:password' with neither empty")
        passwords[user] = password
    return Users(passwords, source)


def load_users(cfg: OpcUaConfig, environ: Mapping[str, str] | None = None) -> Users:
    """The users from `opcua.credentials_file` or the systemd credential 'opcua' (none: no
    user may log in). ConfigError when nobody could log in at all."""
    env = os.environ if environ is None else environ
    users = Users()
    path: Path | None = cfg.credentials_file
    source = f"file {path}"
    if path is None and env.get("CREDENTIALS_DIRECTORY"):
        path = Path(env["CREDENTIALS_DIRECTORY"]) / SYSTEMD_CREDENTIAL
        source = f"systemd credential '{SYSTEMD_CREDENTIAL}'"
        if not path.is_file():
            path = None
    if path is not None:
        try:
            users = _parse_users(path.read_text(encoding="utf-8"), source)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError("opcua.credentials_file", str(path), f"a readable file ({exc})"
                              ) from None
    if not users.passwords and not cfg.allow_anonymous:
        raise ConfigError("opcua.credentials_file", None, "users (a credentials file or the "
                          "systemd credential 'opcua'), or opcua.allow_anonymous: true")
    return users


class VerdictUsers(UserManager):
    """asyncua's hook at ActivateSession: a known user with the right password, or anonymous
    when allowed; never the Admin role (which would skip the access levels).

    It is also where the secure channel itself is checked, as asyncua checks neither: it
    opens an unsecured channel to any client (which the spec allows, for discovery) and then
    lets a session run on it, endpoint or not; and it checks the certificate a client names
    in CreateSession, not the one its channel is secured with. `channel_refusal` gets the
    latter (None: an unsecured channel) and says why a session may not run on it.
    """

    def __init__(self, users: Users, allow_anonymous: bool,
                 channel_refusal: Callable[[bytes | None], str | None] | None = None,
                 on_refused: Callable[[str], None] | None = None) -> None:
        self._users = users
        self._anonymous = allow_anonymous
        self._channel_refusal = channel_refusal
        self._on_refused = on_refused

    def get_user(self, iserver: InternalServer, username: str | None = None,
                 password: str | None = None, certificate: Any = None) -> User | None:
        why = self._channel_refusal(certificate) if self._channel_refusal is not None else None
        if why is not None:
            log.warning("opcua_session_refused", why=why, user=username)
            self._refuse(why)
            return None
        if username is None:
            if self._anonymous:
                return User(role=UserRole.User, name="anonymous")
            self._refuse("anonymous")
            return None
        expected = self._users.passwords.get(username)
        # Digests compared in constant time, also for an unknown user: no timing tells which
        # user names exist or how long a password is.
        given = hashlib.sha256((password or "").encode("utf-8")).digest()
        wanted = hashlib.sha256((expected or "").encode("utf-8")).digest()
        if hmac.compare_digest(given, wanted) and expected is not None:
            return User(role=UserRole.User, name=username)
        self._refuse("password")
        return None

    def _refuse(self, why: str) -> None:
        """Counted; asyncua answers BadUserAccessDenied."""
        if self._on_refused is not None:
            self._on_refused(why)


def identity_tokens(users: Users, allow_anonymous: bool) -> list[type]:
    tokens: list[type] = [ua.UserNameIdentityToken] if users.passwords else []
    if allow_anonymous:
        tokens.append(ua.AnonymousIdentityToken)
    return tokens


#: Where `guard_session_rebinding` keeps a server's channel check, on its internal server.
_REFUSAL_ATTR = "_cv_channel_refusal"
_ACTIVATE_SESSION = ua.NodeId(ua.Int32(ua.ObjectIds.ActivateSessionRequest_Encoding_DefaultBinary))


def guard_session_rebinding(iserver: InternalServer,
                            refusal: Callable[[bytes | None], str | None]) -> None:
    """Judge the channel before asyncua hands a live session to a new connection.

    On ActivateSession over a connection without a session (a reconnect), asyncua looks the
    session up by its authentication token and binds it to that connection (subscriptions'
    publish callbacks included) *before* the user check runs, and keeps it bound when that
    check refuses: a client on an unsecured channel holding a token sniffed from a
    signed-only channel would take over the PLC's session. The refusal is raised first.
    """
    setattr(iserver, _REFUSAL_ATTR, refusal)
    if getattr(UaProcessor, "_cv_guarded", False):
        return
    original: Callable[..., Awaitable[Any]] = UaProcessor._process_message

    async def guarded(self: UaProcessor, typeid: ua.NodeId, requesthdr: Any, seqhdr: Any,
                      body: Any) -> Any:
        check = getattr(self.iserver, _REFUSAL_ATTR, None)
        if check is not None and typeid == _ACTIVATE_SESSION and not self.session:
            why = check(self._connection.security_policy.peer_certificate or None)
            if why is not None:
                log.warning("opcua_session_rebind_refused", why=why)
                raise ServiceError(ua.StatusCodes.BadSecurityChecksFailed)
        return await original(self, typeid, requesthdr, seqhdr, body)

    setattr(UaProcessor, "_process_message", guarded)  # noqa: B010 - one class-wide guard
    setattr(UaProcessor, "_cv_guarded", True)  # noqa: B010
