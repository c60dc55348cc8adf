"""The units' own command lines, run as systemd would run them on a plain x86 box (ONNX Runtime).

Each `ExecStart=` is parsed from the unit file and run with the example site config switched
to ONNX Runtime, synthetic cameras and a loopback broker, with every path in a temp folder:
the engines step must succeed (the node unit `Requires=` it), the node must go READY under a
NOTIFY_SOCKET and stop cleanly on SIGTERM, and the update step must find nothing to do.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.config import DEFAULT_MANIFEST
from edge.publish.broker import MosquittoBroker

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"
EXEC = "/opt/conveyor-vision/current/venv/bin/edge-node"
SITE_CONFIG = "/etc/conveyor-vision/config.yaml"


def _exec_start(unit: str) -> list[str]:
    """The unit's ExecStart= command line, split as systemd splits it."""
    lines = [line.partition("=")[2] for line in (UNITS / unit).read_text().splitlines()
             if line.startswith("ExecStart=")]
    assert len(lines) == 1, lines
    argv = shlex.split(lines[0])
    assert argv[0] == EXEC
    return argv


def _x86_config(tmp_path: Path, broker: MosquittoBroker) -> Path:
    """The example site config as a plain x86 box without cameras would run it."""
    data = yaml.safe_load((UNITS / "conveyor-vision.example.yaml").read_text())
    data.pop("cameras")  # the defaults: synthetic views
    data["models"].update(manifest=str(DEFAULT_MANIFEST), backend="onnxruntime",
                          engine_cache=str(tmp_path / "cache" / "engines"),
                          gallery_dir=str(tmp_path / "state" / "gallery"))
    data["mqtt"] = {"url": broker.url, "topic_prefix": data["mqtt"]["topic_prefix"]}
    data["storage"]["state_dir"] = str(tmp_path / "state")
    data["http"]["port"] = 0
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _command(argv: list[str], replace: dict[str, str]) -> list[str]:
    """The unit's command with the device's paths replaced, run by this Python."""
    return [sys.executable, "-m", "edge", *(replace.get(a, a) for a in argv[1:])]


def test_engines_unit_succeeds_on_onnx_runtime_with_one_line(
        tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    """`conveyor-vision-engines.service` on an ONNX Runtime box exits 0 with one line saying
    there is nothing to build: the node unit that Requires= it can start."""
    config = _x86_config(tmp_path, mosquitto)
    argv = _command(_exec_start("conveyor-vision-engines.service"), {SITE_CONFIG: str(config)})
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip().splitlines()) == 1, done.stdout
    assert "onnx" in done.stdout.lower()


def test_node_unit_goes_ready_and_stops_cleanly_on_onnx_runtime(
        tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    """`conveyor-vision.service`'s command goes READY=1 under a NOTIFY_SOCKET and exits 0 on
    SIGTERM (systemd's stop)."""
    config = _x86_config(tmp_path, mosquitto)
    argv = _command(_exec_start("conveyor-vision.service"), {SITE_CONFIG: str(config)})
    notify = tmp_path / "notify.sock"
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(notify))
    manager.settimeout(1.0)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify), "PYTHONUNBUFFERED": "1"}
    log = (tmp_path / "node.log").open("wb")
    node = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        said: list[str] = []
        end = time.monotonic() + 120
        while time.monotonic() < end and not any("READY=1" in m for m in said):
            assert node.poll() is None, (tmp_path / "node.log").read_text()[-2000:]
            try:
                said.append(manager.recv(4096).decode())
            except TimeoutError:
                continue
        assert any("READY=1" in m for m in said), said[-3:]
        node.send_signal(signal.SIGTERM)
        assert node.wait(60) == 0, (tmp_path / "node.log").read_text()[-2000:]
    finally:
        if node.poll() is None:
            node.kill()
            node.wait(10)
        manager.close()
        log.close()


def test_update_unit_with_an_empty_inbox_does_nothing_and_succeeds(tmp_path: Path) -> None:
    """`conveyor-vision-update.service`'s command (the timer runs it) exits 0 when no bundle
    waits in the inbox, and it names the node's config (the shadow gate's), which it does not
    read then: here there is none."""
    key = Ed25519PrivateKey.generate().public_key()
    public = tmp_path / "update-signing.pub"
    public.write_bytes(key.public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo))
    (tmp_path / "inbox").mkdir()
    replace = {"/opt/conveyor-vision": str(tmp_path / "root"),
               "/etc/conveyor-vision/update-signing.pub": str(public),
               "/var/lib/conveyor-vision-update/inbox": str(tmp_path / "inbox"),
               SITE_CONFIG: str(tmp_path / "no-config.yaml")}
    unit = _exec_start("conveyor-vision-update.service")
    assert unit[unit.index("--config") + 1] == SITE_CONFIG
    argv = _command(unit, replace)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
