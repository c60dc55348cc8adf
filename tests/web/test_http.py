"""The node's HTTP endpoint against a running node: live page data, images, snapshots, access."""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import ipaddress
import json
import socket
import ssl
import urllib.request
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge.config import ConfigError, HttpConfig, HttpTlsConfig, config_from_mapping
from edge.web.server import read_token, start_http
from tests.web.conftest import LiveNode

TOKEN = "s3cret-token-for-the-floor"


def _jpeg(body: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None
    return img


def test_live_page_and_its_assets_are_served(live_node: LiveNode) -> None:
    """/ is the live page; its script and style load; unknown paths are 404."""
    code, body, ctype = live_node.get("/")
    assert code == 200
    assert ctype.startswith("text/html")
    assert b'id="cameras"' in body
    assert b'id="sidelined"' in body
    for path, kind in (("/static/app.js", "javascript"), ("/static/style.css", "css")):
        code, _, ctype = live_node.get(path)
        assert code == 200
        assert kind in ctype
    assert live_node.get("/static/../server.py")[0] == 404
    assert live_node.get("/nothing")[0] == 404


def test_camera_images_show_the_newest_frame(live_node: LiveNode) -> None:
    """Each camera's JPEG decodes at the camera's resolution and changes as the belt runs."""
    cams = [c.id for c in live_node.cfg.cameras]
    live_node.wait_for("frames", lambda: live_node.live.framesets_seen() > 5)
    for cam in cams:
        code, first, ctype = live_node.get(f"/api/camera/{cam}.jpg")
        assert code == 200
        assert ctype == "image/jpeg"
        cfg = next(c for c in live_node.cfg.cameras if c.id == cam)
        assert _jpeg(first).shape == (cfg.height, cfg.width, 3)
        live_node.wait_for("a newer frame", lambda cam=cam, first=first: live_node.get(
            f"/api/camera/{cam}.jpg")[1] != first, 10.0)
    assert live_node.get("/api/camera/nope.jpg")[0] == 404


def test_status_lists_stages_calibration_and_sidelined_snapshots(live_node: LiveNode) -> None:
    """/api/status has stage timings, calibration per camera and the last sidelined items,
    each with a snapshot sheet and overlays that are served."""
    live_node.wait_for("a sidelined item with a snapshot",
                       lambda: bool(live_node.status()["sidelined"]), 90.0)
    s = live_node.status()
    assert {"capture-top", "sync", "items", "inference"} <= set(s["stage_ms"])
    assert set(s["calibration"]) == {c.id for c in live_node.cfg.cameras}
    for cam in s["calibration"].values():
        assert cam["source"] == "synthetic"
        assert cam["calibrated"] is True
        assert cam["ok"] is True  # the belt check ran on a live frame and passed
        assert cam["check"]["drift_mm"] is not None
    assert s["health"]["broker_connected"] is True
    item = s["sidelined"][0]
    assert item["snapshot_id"]
    assert item["reasons"]
    code, body, ctype = live_node.get(item["sheet"])
    assert code == 200
    assert ctype == "image/jpeg"
    assert _jpeg(body).shape[1] >= 600
    for url in item["overlays"].values():
        assert live_node.get(url)[0] == 200
    code, body, _ = live_node.get(f"/snapshots/{item['snapshot_id']}/verdict.json")
    assert code == 200
    assert json.loads(body)["verdict"]["decision"] == "sideline"
    assert any(r["decision"] == "sideline" for r in s["recent"]) or s["recent"]


def test_snapshot_paths_cannot_leave_the_store(live_node: LiveNode) -> None:
    """Malformed IDs, unknown IDs, dot-files and traversal are all 404."""
    sid = live_node.store.ids()[-1] if live_node.store.ids() else "20260101T000000000-abcd-000001"
    for path in (f"/snapshots/{sid}/../../outbox.sqlite", f"/snapshots/{sid}/.hidden",
                 "/snapshots/..%2F..%2Fetc/passwd", "/snapshots/20260101T000000000-abcd-999999/"
                 "verdict.json", f"/snapshots/{sid}/nope.jpg"):
        assert live_node.get(path)[0] == 404, path


def test_endpoint_is_read_only(live_node: LiveNode) -> None:
    """Anything but GET and HEAD is refused with 405."""
    import urllib.request

    for method in ("POST", "PUT", "DELETE"):
        req = urllib.request.Request(live_node.url + "/metrics", data=b"x", method=method)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=5)
        assert err.value.code == 405


def test_healthz_reports_stalled_stages(live_node: LiveNode) -> None:
    """/healthz is 200 with no stalled stage."""
    code, body, _ = live_node.get("/healthz")
    assert code == 200
    assert json.loads(body) == {"ok": True, "stalled_stages": []}


def test_token_protects_every_route(live_node: LiveNode, tmp_path: Path) -> None:
    """With a token file every route with data wants the token in the Authorization header; a
    wrong one, or the right one in the URL (?token=, which ends up in logs and history), is
    401. Only the page's own files (no data) load without it."""
    token = TOKEN
    (tmp_path / "token").write_text(token + "\n")
    cfg = HttpConfig(port=0, live_page=True, token_file=tmp_path / "token")
    http = start_http(cfg, live_node.node, live=live_node.live)
    try:
        import urllib.request

        def get(path: str, headers: dict[str, str] | None = None) -> int:
            req = urllib.request.Request(http.url + path, headers=headers or {})
            try:
                with urllib.request.urlopen(req, timeout=5) as res:
                    return int(res.status)
            except urllib.error.HTTPError as err:
                return err.code

        # The page's own files hold no data: a browser loads them, then sends the header.
        assert get("/") == 200
        assert get("/static/app.js") == 200
        for path in ("/metrics", "/healthz", "/api/status", "/api/camera/top.jpg"):
            assert get(path) == 401
            assert get(path + "?token=wrong-token-wrong-token") == 401
            assert get(path + f"?token={token}") == 401
            assert get(path, {"Authorization": "Bearer wrong-token-wrong-token"}) == 401
            # (no frame yet, or a stalled stage, is the node's answer: past the token check)
            assert get(path, {"Authorization": f"Bearer {token}"}) not in (401, 403)
        assert get("/metrics", {"Authorization": f"Bearer {token}"}) == 200
        assert get("/api/status", {"Authorization": f"Bearer {token}"}) == 200
    finally:
        http.shutdown()


def test_binding_beyond_loopback_needs_a_token(tmp_path: Path) -> None:
    """A non-loopback bind without a token file is a config error naming http.token_file."""
    with pytest.raises(ConfigError, match=r"http\.token_file"):
        read_token(HttpConfig(port=9108, bind="0.0.0.0"))
    (tmp_path / "short").write_text("abc")
    with pytest.raises(ConfigError, match="16 characters"):
        read_token(HttpConfig(port=9108, bind="0.0.0.0", token_file=tmp_path / "short"))
    assert read_token(HttpConfig(port=9108, bind="127.0.0.1")) is None
    assert read_token(HttpConfig(port=9108, bind="::1")) is None


def test_a_bind_beyond_loopback_without_a_token_is_refused_when_the_config_loads() -> None:
    """Not at start_http, after the models and cameras came up (a systemd restart loop)."""
    with pytest.raises(ConfigError, match=r"http\.token_file"):
        config_from_mapping({"http": {"port": 9108, "bind": "0.0.0.0"}})
    config_from_mapping({"http": {"port": 0, "bind": "0.0.0.0"}})  # off: nothing to protect


def test_metrics_are_served_on_the_ipv6_loopback(live_node: LiveNode) -> None:
    """`::1` counts as loopback; it used to pass the config and fail to bind (IPv4 server)."""
    import urllib.request

    http = start_http(HttpConfig(port=0, bind="::1"), live_node.node)
    try:
        assert http.url.startswith("http://[::1]:")
        with urllib.request.urlopen(http.url + "/metrics", timeout=5) as res:
            assert res.status == 200
    finally:
        http.shutdown()


def test_an_idle_connection_does_not_hold_its_thread_for_ever(live_node: LiveNode,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """A client that connects and sends nothing is dropped after the handler's timeout (there
    was none: every idle connection held a thread for ever). Shortened here from 30 s."""
    import socket

    from edge.web import server

    assert server._Handler.timeout is not None
    assert 0 < server._Handler.timeout <= 60
    monkeypatch.setattr(server._Handler, "timeout", 0.3)
    http = start_http(HttpConfig(port=0), live_node.node)
    try:
        with socket.create_connection(("127.0.0.1", http.port), timeout=5) as idle:
            idle.settimeout(5)
            assert idle.recv(1) == b""  # closed by the server, not by us
    finally:
        http.shutdown()


def test_live_page_off_serves_metrics_only(live_node: LiveNode) -> None:
    """Production default: /metrics yes, the page and its API no."""
    http = start_http(HttpConfig(port=0, live_page=False), live_node.node)
    try:
        import urllib.request

        with urllib.request.urlopen(http.url + "/metrics", timeout=5) as res:
            assert res.status == 200
        for path in ("/", "/api/status", "/api/camera/top.jpg"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(http.url + path, timeout=5)
            assert err.value.code == 404
    finally:
        http.shutdown()


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A self-signed server certificate for 127.0.0.1 and its key (PEM files)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "conveyor-vision test")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "http.pem", directory / "http.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_metrics_are_served_over_https_with_the_configured_certificate(
        live_node: LiveNode, tmp_path: Path) -> None:
    """With http.tls set, /metrics answers over HTTPS (the token in the header) and a plain
    http:// request to the same port gets no answer."""
    cert, key = _self_signed(tmp_path)
    (tmp_path / "token").write_text(TOKEN)
    cfg = HttpConfig(port=0, bind="127.0.0.1", token_file=tmp_path / "token",
                     tls=HttpTlsConfig(cert_file=cert, key_file=key))
    server = start_http(cfg, live_node.node)
    try:
        assert server.url.startswith("https://127.0.0.1:")
        trust = ssl.create_default_context(cafile=str(cert))
        req = urllib.request.Request(server.url + "/metrics",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(req, timeout=5, context=trust) as res:
            assert res.status == 200
            assert b"# TYPE" in res.read()
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(server.url + "/metrics", timeout=5, context=trust)
        assert err.value.code == 401
        plain = server.url.replace("https://", "http://") + "/metrics"
        with pytest.raises((OSError, http.client.HTTPException)):
            urllib.request.urlopen(urllib.request.Request(
                plain, headers={"Authorization": f"Bearer {TOKEN}"}), timeout=5)
        # the server is still up after the plain request
        with urllib.request.urlopen(req, timeout=5, context=trust) as res:
            assert res.status == 200
    finally:
        server.shutdown()


def test_a_bind_beyond_loopback_without_tls_is_refused_when_the_config_loads(
        tmp_path: Path) -> None:
    """Bound beyond loopback, plain HTTP needs http.allow_plaintext: true; HTTPS needs both the
    certificate and the key. (Checked at load only: tests never bind beyond loopback.)"""
    (tmp_path / "token").write_text(TOKEN)
    cert, key = _self_signed(tmp_path)
    http_cfg: dict[str, Any] = {"port": 9108, "bind": "0.0.0.0",
                                "token_file": str(tmp_path / "token")}
    with pytest.raises(ConfigError) as err:
        config_from_mapping({"http": http_cfg})
    assert err.value.path == "http.tls.cert_file"
    assert "http.allow_plaintext" in str(err.value)
    assert "clear text" in str(err.value)
    with pytest.raises(ConfigError, match=r"http\.tls\.key_file"):
        config_from_mapping({"http": {**http_cfg, "tls": {"cert_file": str(cert)}}})
    assert config_from_mapping({"http": {**http_cfg, "allow_plaintext": True}}).http.allow_plaintext
    tls = {"cert_file": str(cert), "key_file": str(key)}
    assert config_from_mapping({"http": {**http_cfg, "tls": tls}}).http.tls.key_file == key
    assert config_from_mapping({"http": {"port": 9108}})  # loopback: plain HTTP is fine


def test_a_certificate_that_does_not_load_is_a_config_error(live_node: LiveNode,
                                                            tmp_path: Path) -> None:
    """A key that is not the certificate's refuses to start, naming http.tls.cert_file."""
    cert, _ = _self_signed(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _, wrong_key = _self_signed(other)
    cfg = HttpConfig(port=0, bind="127.0.0.1", tls=HttpTlsConfig(cert_file=cert,
                                                                   key_file=wrong_key))
    with pytest.raises(ConfigError, match=r"http\.tls\.cert_file"):
        start_http(cfg, live_node.node)


def test_the_token_is_never_logged(live_node: LiveNode, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Access and error log lines never hold the token, wherever a client put it."""
    from edge.web import server as web_server

    logged: list[str] = []

    class Recorder:
        def __getattr__(self, level: str) -> Any:
            return lambda event, **kw: logged.append(f"{level} {event} {kw!r}")

    monkeypatch.setattr(web_server, "log", Recorder())
    (tmp_path / "token").write_text(TOKEN)
    server = start_http(HttpConfig(port=0, live_page=True, token_file=tmp_path / "token"),
                        live_node.node, live=live_node.live)
    try:
        for path, headers in ((f"/metrics?token={TOKEN}", {}),
                              ("/metrics", {"Authorization": f"Bearer {TOKEN}"}),
                              (f"/api/status?x=1&token={TOKEN}",
                               {"Authorization": f"Bearer {TOKEN}"}),
                              (f"/nothing?token={TOKEN}", {"Authorization": f"Bearer {TOKEN}"})):
            req = urllib.request.Request(server.url + path, headers=headers)
            with contextlib.suppress(urllib.error.HTTPError):
                urllib.request.urlopen(req, timeout=5).close()
        # a malformed request line, echoed by the standard library's error path
        with socket.create_connection(("127.0.0.1", server.port), 5) as raw:
            raw.sendall(f"GET /?token={TOKEN} {TOKEN}\r\n\r\n".encode())
            assert b"Error code: 400" in raw.makefile("rb").read()
    finally:
        server.shutdown()
    requests = [line for line in logged if "http_request" in line]
    assert len(requests) >= 5
    assert all(TOKEN not in line for line in logged), logged
