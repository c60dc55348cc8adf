"""The node's HTTP endpoint: Prometheus ``/metrics`` and the read-only live page.

Routes (GET and HEAD only; everything is read-only):

* ``/metrics``: the Prometheus text format (`edge.pipeline.metrics`).
* ``/healthz``: 200 when no stage is stalled, 503 otherwise (JSON body).
* ``/`` and ``/static/…``: the live page (only with ``http.live_page``).
* ``/api/status``: JSON for the page: stage timings, counters, cameras, calibration,
  recent verdicts and the last sidelined items with their snapshots.
* ``/api/camera/<id>.jpg``: the newest frame of a camera with item boxes drawn on.
* ``/snapshots/<id>/<file>``: a stored snapshot's files.

Bound to loopback by default. Bound anywhere else it refuses to start
without ``http.token_file`` and without HTTPS (``http.tls.cert_file`` and
``http.tls.key_file``; ``http.allow_plaintext: true`` accepts plain HTTP).
With a token file every request must carry the token in the header
``Authorization: Bearer <token>``; a token in the URL is not accepted (URLs end
up in logs, browser history and proxies). The token is never logged: request
lines are logged without their query string.
"""

from __future__ import annotations

import hmac
import json
import re
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog
from prometheus_client import CONTENT_TYPE_LATEST

from edge.config import ConfigError, HttpConfig, check_http_tls, check_http_token
from edge.pipeline.node import Node
from edge.web.live import LiveFeed, tracks_of
from edge.web.status import page_status

log = structlog.get_logger(__name__)

STATIC_DIR = Path(__file__).resolve().parent
_STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
           "style.css": "text/css; charset=utf-8"}
_SNAPSHOT_FILE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_TYPES = {".jpg": "image/jpeg", ".png": "image/png", ".json": "application/json",
          ".npy": "application/octet-stream"}
#: A query string in a logged request line: cut, it may hold a token.
_QUERY = re.compile(r"\?[^\s\"']*")


def read_token(cfg: HttpConfig) -> str | None:
    """The access token, required (ConfigError) when bound beyond loopback."""
    check_http_token(cfg)
    if cfg.token_file is None:
        return None
    token = Path(cfg.token_file).read_text(encoding="utf-8").strip()
    if len(token) < 16:
        raise ConfigError("http.token_file", str(cfg.token_file),
                          "a file holding a token of at least 16 characters")
    return token


def server_tls_context(cfg: HttpConfig) -> ssl.SSLContext | None:
    """The HTTPS context from `http.tls` (None: plain HTTP), refused (ConfigError) where
    plain HTTP is not allowed or the certificate and key do not load."""
    check_http_tls(cfg)
    cert, key = cfg.tls.cert_file, cfg.tls.key_file
    if cert is None or key is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        # an encrypted key fails here instead of prompting on a terminal nobody watches
        ctx.load_cert_chain(str(cert), str(key), password=lambda: b"")
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("http.tls.cert_file", str(cert),
                          f"a PEM certificate matching the unencrypted key in http.tls.key_file "
                          f"({exc})") from None
    return ctx


class HttpServer:
    """The running server; `shutdown()` stops it and joins its thread."""

    def __init__(self, server: ThreadingHTTPServer, thread: threading.Thread,
                 scheme: str = "http") -> None:
        self._server = server
        self._thread = thread
        self._scheme = scheme

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = str(self._server.server_address[0])
        host = f"[{host}]" if ":" in host else host
        return f"{self._scheme}://{host}:{self.port}"

    def shutdown(self, timeout_s: float = 5.0) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("http_thread_did_not_stop")


class _App:
    """Everything a request handler reads (built once per server)."""

    def __init__(self, cfg: HttpConfig, node: Node, live: LiveFeed | None,
                 calibration: Callable[[], Mapping[str, Any]] | None, token: str | None) -> None:
        self.cfg = cfg
        self.node = node
        self.live = live
        self.calibration = calibration
        self.token = token


def start_http(cfg: HttpConfig, node: Node, *, live: LiveFeed | None = None,
               calibration: Callable[[], Mapping[str, Any]] | None = None) -> HttpServer:
    """Serve `/metrics` (and the live page when `cfg.live_page`) on a named thread.

    `live` supplies camera images and recent verdicts (attach it to the node's
    hooks with `LiveFeed.wrap`); `calibration` returns the latest belt-check
    results per camera (`edge.app.service.BeltMonitor.results`).
    """
    app = _App(cfg, node, live, calibration, read_token(cfg))
    tls = server_tls_context(cfg)  # before binding: refused configs bind nothing
    handler = type("Handler", (_Handler,), {"app": app})
    server_class = _HttpServer6 if ":" in cfg.bind else _HttpServer
    server = server_class((cfg.bind, cfg.port), handler)
    server.daemon_threads = True
    server.tls = tls
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True,
                              kwargs={"poll_interval": 0.1})
    thread.start()
    http = HttpServer(server, thread, "https" if tls is not None else "http")
    log.info("http_started", url=http.url, live_page=cfg.live_page,
             token=app.token is not None, tls=tls is not None)
    return http


class _HttpServer(ThreadingHTTPServer):
    """The standard server, speaking TLS when `tls` is set."""

    tls: ssl.SSLContext | None = None

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, addr = super().get_request()
        if self.tls is not None:
            # The handshake runs on the connection's own thread, at its first read (under
            # the handler's timeout): a slow client does not hold up the accept loop.
            conn = self.tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        return conn, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, ssl.SSLError | ConnectionError | TimeoutError):
            # plain HTTP to the HTTPS port, a failed handshake, a client gone or idle
            log.debug("http_connection_failed", client=client_address[0],
                      error=type(exc).__name__)
            return
        log.warning("http_connection_error", client=client_address[0],
                    error=type(exc).__name__)


class _HttpServer6(_HttpServer):
    """An IPv6 bind address (`::1`, `::`): the standard server speaks IPv4 only."""

    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    app: _App
    server_version = "conveyor-vision"
    protocol_version = "HTTP/1.1"
    # A client that opens a connection and sends nothing (or keeps it idle) must not hold
    # a thread for ever: one thread per connection, and the token is read with the request.
    timeout = 30.0

    def log_message(self, format: str, *args: Any) -> None:
        # Request lines (access log and errors) go without their query string, and the
        # token itself is masked wherever else a client may have put it.
        line = _QUERY.sub("?***", format % args)
        if self.app.token:
            line = line.replace(self.app.token, "***")
        log.debug("http_request", client=self.client_address[0], line=line)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def _refuse(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"read-only\n", "text/plain", head=False,
                   extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse  # noqa: N815

    def _authorized(self) -> bool:
        """The token in `Authorization: Bearer`; never from the URL."""
        token = self.app.token
        if token is None:
            return True
        given = self.headers.get("Authorization", "")
        offered = given[7:].strip() if given.startswith("Bearer ") else ""
        return hmac.compare_digest(offered.encode(), token.encode())

    def _dispatch(self, head: bool) -> None:
        # Only the path is kept: the query string may carry a token (an old page, a habit)
        # that must not reach an error log, nor its traceback's locals.
        path = urlsplit(self.path).path
        # The page's own files hold no data: a browser loads them without a header, and the
        # page then sends the token with every request for data.
        if not self._authorized() and not _is_page_asset(path):
            self._send(HTTPStatus.UNAUTHORIZED, b"token required (Authorization: Bearer)\n",
                       "text/plain", head, extra={"WWW-Authenticate": "Bearer"})
            return
        try:
            self._route(path, head)
        except BrokenPipeError:
            pass
        except Exception:
            log.exception("http_error", path=path)
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"error\n", "text/plain", head)

    def _route(self, path: str, head: bool) -> None:
        app = self.app
        if path == "/metrics":
            self._send(HTTPStatus.OK, app.node.metrics.exposition(), CONTENT_TYPE_LATEST, head)
        elif path == "/healthz":
            stalled = app.node.stalled_stages()
            self._json({"ok": not stalled, "stalled_stages": stalled}, head,
                       HTTPStatus.OK if not stalled else HTTPStatus.SERVICE_UNAVAILABLE)
        elif not app.cfg.live_page:
            self._send(HTTPStatus.NOT_FOUND, b"not found (live page off)\n", "text/plain", head)
        elif path in ("/", "/index.html"):
            self._static("index.html", head)
        elif path.startswith("/static/"):
            self._static(path[len("/static/"):], head)
        elif path == "/api/status":
            self._json(page_status(app.node, app.live, app.calibration, app.cfg.live_recent),
                       head)
        elif path.startswith("/api/camera/") and path.endswith(".jpg"):
            self._camera(path[len("/api/camera/"):-len(".jpg")], head)
        elif path.startswith("/snapshots/"):
            self._snapshot_file(path[len("/snapshots/"):], head)
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain", head)

    def _static(self, name: str, head: bool) -> None:
        if name not in _STATIC:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain", head)
            return
        self._send(HTTPStatus.OK, (STATIC_DIR / name).read_bytes(), _STATIC[name], head)

    def _camera(self, camera_id: str, head: bool) -> None:
        node, live = self.app.node, self.app.live
        data = None
        if live is not None:
            data = live.camera_jpeg(camera_id, node.cameras.planes,
                                    node.cfg.belt.speed_mps,  # m/s == mm/ms
                                    tracks_of(getattr(node, "tracker", None)))
        if data is None:
            self._send(HTTPStatus.NOT_FOUND, b"no frame from this camera yet\n", "text/plain",
                       head)
            return
        self._send(HTTPStatus.OK, data, "image/jpeg", head)

    def _snapshot_file(self, rest: str, head: bool) -> None:
        store = self.app.node.snapshots
        snapshot_id, _, name = rest.partition("/")
        folder = store.path(snapshot_id) if store is not None else None
        if folder is None or not _SNAPSHOT_FILE.match(name) or name.startswith("."):
            self._send(HTTPStatus.NOT_FOUND, b"no such snapshot\n", "text/plain", head)
            return
        try:
            data = (folder / name).read_bytes()
        except OSError:  # not there, or evicted meanwhile
            self._send(HTTPStatus.NOT_FOUND, b"no such file\n", "text/plain", head)
            return
        self._send(HTTPStatus.OK, data, _TYPES.get(Path(name).suffix, "application/octet-stream"),
                   head, extra={"Cache-Control": "max-age=3600"})

    def _json(self, body: Mapping[str, Any], head: bool,
              status: HTTPStatus = HTTPStatus.OK) -> None:
        data = json.dumps(body, allow_nan=False, default=str).encode("utf-8")
        self._send(status, data, "application/json", head)

    def _send(self, status: HTTPStatus, body: bytes, ctype: str, head: bool,
              extra: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        headers = {"Cache-Control": "no-store", **(extra or {})}
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)


def _is_page_asset(path: str) -> bool:
    """The live page's HTML, script and style sheet (no node data in them)."""
    return path in ("/", "/index.html") or (
        path.startswith("/static/") and path[len("/static/"):] in _STATIC)
