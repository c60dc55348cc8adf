"""The node-opcua PLC stand-in (tests/interop/opcua/plc_client.js) and a node that serves it:
shared by the interop test and tools/opcua_interop.py."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.catalogue import load_catalogue
from edge.config import Config, NodeConfig, OpcUaConfig, load_config
from edge.publish.opcua.certs import CertFiles, write_certificates
from edge.sim.conveyor import SyntheticConveyor
from edge.types import Announcement
from tests.publish.opcua.helpers import ClientCert, client_cert

REPO = Path(__file__).resolve().parents[3]
JS_DIR = REPO / "tests" / "interop" / "opcua"
USER, PASSWORD = "plc", "interop-secret"


def js_client_missing() -> str | None:
    """Why the node-opcua client cannot run here (None: it can)."""
    if shutil.which("node") is None:
        return "node (Node.js) is not installed"
    if not (JS_DIR / "node_modules" / "node-opcua-client").is_dir():
        return f"node-opcua is not installed: run `npm ci --omit=dev` in {JS_DIR}"
    return None


@dataclass(frozen=True)
class Pki:
    server: CertFiles
    client: ClientCert
    credentials: Path


def make_pki(root: Path) -> Pki:
    """A server certificate, a trusted client certificate, a user and its password."""
    server = write_certificates(root / "server", NodeConfig(), ["localhost", "127.0.0.1"])
    client = client_cert(root / "client", "interop-plc", server.trusted)
    credentials = root / "opcua-users"
    credentials.write_text(f"{USER}:{PASSWORD}\n")
    return Pki(server, client, credentials)


def node_config(tmp: Path, broker_url: str, port: int, pki: Pki,
                items_per_second: float, seed: int = 3, max_clients: int = 20) -> Config:
    """The node's defaults on a short belt, with OPC UA on SignAndEncrypt only."""
    cfg = load_config(None)
    return dataclasses.replace(
        cfg,
        synthetic=dataclasses.replace(cfg.synthetic, items_per_second=items_per_second,
                                      damage_rate=0.2, touching_rate=0.0, seed=seed),
        belt=dataclasses.replace(cfg.belt, induct_to_camera_m=1.0),
        mqtt=dataclasses.replace(cfg.mqtt, url=broker_url),
        storage=dataclasses.replace(cfg.storage, state_dir=tmp / "state"),
        models=dataclasses.replace(cfg.models, gallery_dir=tmp / "state" / "gallery"),
        opcua=OpcUaConfig(enabled=True, port=port, security=("sign_and_encrypt",),
                          cert_file=pki.server.cert, key_file=pki.server.key,
                          trusted_dir=pki.server.trusted, credentials_file=pki.credentials,
                          max_clients=max_clients))


class WithPhantoms:
    """The world's announcements, plus one every `every_ms` for an item that is never on the
    belt: the node gives it a fail-safe (not_seen) verdict at its deadline."""

    def __init__(self, world: SyntheticConveyor, every_ms: float, until_ms: float) -> None:
        self._world = world
        self._every_ms = every_ms
        #: no phantoms after this (ms after the belt started)
        self.until_ms = until_ms
        self._sent = 0
        self._next_ms: float | None = None
        self._product = sorted(load_catalogue().ids())[0]
        self.phantoms: list[str] = []

    def __call__(self, wall_ms: float, _skip: int) -> list[Announcement]:
        due = self._world.due_announcements(wall_ms, self._sent)
        self._sent += len(due)
        if self._next_ms is None:
            self._next_ms = self._world.start_ms + self._every_ms / 2
        if wall_ms >= self._next_ms and wall_ms - self._world.start_ms < self.until_ms:
            self._next_ms += self._every_ms
            item_id = f"PHANTOM-{len(self.phantoms)}"
            self.phantoms.append(item_id)
            due.append(Announcement(item_id, self._product, induct_time_ms=wall_ms))
        return due


@dataclass
class JsClient:
    """One plc_client.js process: its JSON lines, as they come."""

    process: subprocess.Popen[str]
    lines: list[dict[str, Any]] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    _ready: threading.Event = field(default_factory=threading.Event)

    @staticmethod
    def start(url: str, pki: Pki, *, interval_ms: int = 20, churn: int = 0,
              extra: Sequence[str] = (), nice: int = 0) -> JsClient:
        """`nice`: run at that niceness (clients that stand for other machines, whose CPU
        should not come out of the node's)."""
        pki_dir = pki.client.cert.parent / f"js-pki-{time.monotonic_ns()}"
        args = [*(["nice", "-n", str(nice)] if nice else []),
                "node", "plc_client.js", "--endpoint", url, "--user", USER,
                "--password", PASSWORD, "--cert", str(pki.client.cert),
                "--key", str(pki.client.key), "--app-uri", pki.client.app_uri,
                "--server-cert", str(pki.server.cert), "--pki", str(pki_dir),
                "--interval", str(interval_ms), *extra]
        if churn:
            args += ["--churn", str(churn)]
        proc = subprocess.Popen(args, cwd=JS_DIR, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        client = JsClient(proc)
        threading.Thread(target=client._read, daemon=True).start()
        threading.Thread(target=client._read_stderr, daemon=True).start()
        return client

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            self.lines.append(obj)
            if obj.get("type") == "ready":
                self._ready.set()

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr.append(line.rstrip())

    def wait_ready(self, timeout_s: float) -> bool:
        return self._ready.wait(timeout_s)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [line for line in list(self.lines) if line.get("type") == kind]

    def stop(self, timeout_s: float = 10.0) -> int:
        assert self.process.stdin is not None
        self.process.stdin.close()  # the client disconnects and exits
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def wait_for(check: Callable[[], bool], timeout_s: float, step_s: float = 0.1) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(step_s)
    return check()
