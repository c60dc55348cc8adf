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
without ``http.token_file``, and then every request must carry the token,
as ``Authorization: Bearer <token>`` or ``?token=<token>`` (the page passes
its own ``?token=`` on to the requests it makes).
"""

from __future__ import annotations

import hmac
import json
import re
import socket
import threading
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import structlog
from prometheus_client import CONTENT_TYPE_LATEST

from edge.config import ConfigError, HttpConfig, check_http_token
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


class HttpServer:
    """The running server; `shutdown()` stops it and joins its thread."""

    def __init__(self, server: ThreadingHTTPServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = str(self._server.server_address[0])
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

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
    handler = type("Handler", (_Handler,), {"app": app})
    server_class = _HttpServer6 if ":" in cfg.bind else ThreadingHTTPServer
    server = server_class((cfg.bind, cfg.port), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True,
                              kwargs={"poll_interval": 0.1})
    thread.start()
    http = HttpServer(server, thread)
    log.info("http_started", url=http.url, live_page=cfg.live_page,
             token=app.token is not None)
    return http


class _HttpServer6(ThreadingHTTPServer):
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
        log.debug("http_request", client=self.client_address[0], line=format % args)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def _refuse(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"read-only\n", "text/plain", head=False,
                   extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse  # noqa: N815

    def _authorized(self, query: Mapping[str, list[str]]) -> bool:
        token = self.app.token
        if token is None:
            return True
        given = self.headers.get("Authorization", "")
        offered = given[7:] if given.startswith("Bearer ") else query.get("token", [""])[0]
        return hmac.compare_digest(offered.encode(), token.encode())

    def _dispatch(self, head: bool) -> None:
        url = urlsplit(self.path)
        if not self._authorized(parse_qs(url.query)):
            self._send(HTTPStatus.UNAUTHORIZED, b"token required\n", "text/plain", head,
                       extra={"WWW-Authenticate": "Bearer"})
            return
        try:
            self._route(url.path, head)
        except BrokenPipeError:
            pass
        except Exception:
            log.exception("http_error", path=url.path)
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
