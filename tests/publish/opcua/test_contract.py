"""The OPC UA contract and configuration: stable bits and node IDs, documented; what the
config refuses before anything starts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edge.app.channels import controller_channels
from edge.clock import WallClock
from edge.config import ConfigError, OpcUaConfig, config_from_mapping
from edge.publish.opcua.channel import OpcUaChannel
from edge.publish.opcua.contract import (
    DECISION_NAMES,
    REASON_BITS,
    all_node_ids,
    reasons_from_mask,
    reasons_mask,
)
from edge.publish.opcua.security import load_users
from edge.types import Reason

DOC = Path(__file__).resolve().parents[3] / "docs" / "opcua.md"


def test_every_reason_has_its_own_bit_and_the_docs_list_them() -> None:
    """Each edge.types.Reason has one fixed bit in Reasons, documented in docs/opcua.md."""
    assert set(REASON_BITS) == set(Reason)
    assert sorted(REASON_BITS.values()) == list(range(len(Reason)))
    text = DOC.read_text()
    for reason, bit in REASON_BITS.items():
        assert re.search(rf"\|\s*{bit}\s*\|\s*{1 << bit}\s*\|\s*`{reason.value}`", text), reason
    every = reasons_mask(Reason)
    assert reasons_from_mask(every) == sorted(Reason, key=lambda r: REASON_BITS[r])
    assert all(f"{i} = {name}" in text for i, name in enumerate(DECISION_NAMES))


def test_the_docs_list_every_node_id() -> None:
    """Every string node ID the server adds is in docs/opcua.md's tables."""
    text = DOC.read_text()
    missing = [i for i in all_node_ids() if f"`s={i}`" not in text]
    assert missing == []


def test_security_none_is_refused_beyond_loopback_and_secure_needs_certificates() -> None:
    """'none' only on a loopback bind; Sign/SignAndEncrypt need a certificate, its key and
    a trust folder; an empty list of endpoints is refused; nothing is checked while off."""
    with pytest.raises(ConfigError, match=r"opcua\.security"):
        config_from_mapping({"opcua": {"enabled": True, "bind": "0.0.0.0",
                                       "security": ["none", "sign"]}})
    with pytest.raises(ConfigError, match=r"opcua\.cert_file"):
        config_from_mapping({"opcua": {"enabled": True}})
    with pytest.raises(ConfigError, match=r"opcua\.security"):
        config_from_mapping({"opcua": {"enabled": True, "security": []}})
    ok = config_from_mapping({"opcua": {"enabled": True, "bind": "::1", "security": ["none"],
                                        "allow_anonymous": True}})
    assert ok.opcua.security == ("none",)
    assert config_from_mapping({"opcua": {"bind": "0.0.0.0", "security": ["none"]}})


def test_users_come_from_the_credentials_file_or_the_systemd_credential(
        tmp_path: Path) -> None:
    """'user:password' lines from opcua.credentials_file or $CREDENTIALS_DIRECTORY/opcua;
    nobody to log in (and no anonymous) or a malformed line is a ConfigError."""
    cred_dir = tmp_path / "creds"
    cred_dir.mkdir()
    (cred_dir / "opcua").write_text("# PLCs\nplc1:pw:with:colons\n\nscada:x\n")
    users = load_users(OpcUaConfig(), {"CREDENTIALS_DIRECTORY": str(cred_dir)})
    assert dict(users.passwords) == {"plc1": "pw:with:colons", "scada": "x"}
    assert "pw" not in repr(users)
    with pytest.raises(ConfigError, match="anonymous"):
        load_users(OpcUaConfig(), {})
    assert not load_users(OpcUaConfig(allow_anonymous=True), {}).passwords
    bad = tmp_path / "bad"
    bad.write_text("no-colon-here\n")
    with pytest.raises(ConfigError, match="line 1"):
        load_users(OpcUaConfig(credentials_file=bad), {})


def test_the_channel_is_built_only_when_enabled(tmp_path: Path) -> None:
    """controller_channels adds the OPC UA channel when opcua.enabled, and not otherwise."""
    users = tmp_path / "users"
    users.write_text("plc:secret\n")
    off = config_from_mapping({})
    on = config_from_mapping({"opcua": {"enabled": True, "security": ["none"],
                                        "credentials_file": str(users)}})
    assert not any(isinstance(c, OpcUaChannel) for c in controller_channels(off, WallClock()))
    channels = controller_channels(on, WallClock())
    assert [type(c) for c in channels] == [OpcUaChannel]


def test_the_demo_serves_opcua_on_loopback_without_security(tmp_path: Path) -> None:
    """`edge-node demo --opcua-port P`: OPC UA on 127.0.0.1:P, no security, anonymous, every
    result shown as it comes."""
    from edge.app.demo import DemoOptions, demo_config
    from edge.commands.main import build_parser

    args = build_parser().parse_args(["demo", "--opcua-port", "4855"])
    assert args.opcua_port == 4855
    base = config_from_mapping({})
    cfg = demo_config(base, DemoOptions(opcua_port=4855), "mqtt://127.0.0.1:1", tmp_path)
    assert cfg.opcua.enabled
    assert (cfg.opcua.bind, cfg.opcua.port) == ("127.0.0.1", 4855)
    assert cfg.opcua.security == ("none",)
    assert cfg.opcua.allow_anonymous
    assert not cfg.opcua.handshake  # a client that only watches acknowledges nothing
    assert not demo_config(base, DemoOptions(), "mqtt://127.0.0.1:1", tmp_path).opcua.enabled
