"""The node's side of systemd (sd_notify, watchdog, health file); the unit files
themselves are checked in tests/systemd/test_unit_files.py.

The NOTIFY_SOCKET test plays systemd with a real AF_UNIX datagram socket and drives a
stand-in node that loads a real ONNX Runtime model and connects to a real mosquitto;
the lead's end-to-end test does the same against `edge-node run`.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import paho.mqtt.client as mqtt
import pytest
from onnx import TensorProto, helper
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from edge.app.systemd import (
    SystemdNotifier,
    WatchdogPinger,
    notify_address,
    watchdog_interval_s,
)
from edge.health_file import HealthFile, health_file_path, read_health
from edge.publish.broker import MosquittoBroker


class StageHeartbeats:
    """A fake node's stages: each `beat(name)`s every round; `stalled()` names those silent
    for longer than their limit (the health callback `WatchdogPinger` polls)."""

    def __init__(self, limits_s: dict[str, float]) -> None:
        self._limits = dict(limits_s)
        self._last = dict.fromkeys(self._limits, time.monotonic())
        self._lock = threading.Lock()

    def beat(self, name: str) -> None:
        with self._lock:
            self._last[name] = time.monotonic()

    def stalled(self) -> tuple[str, ...]:
        now = time.monotonic()
        with self._lock:
            return tuple(n for n, t in self._last.items() if now - t > self._limits[n])




class FakeSystemd:
    """The manager's end of NOTIFY_SOCKET: collects (monotonic time, message) pairs."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-systemd", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            self.messages.append((time.monotonic(), fields))

    def with_key(self, key: str, since: float = 0.0) -> list[tuple[float, dict[str, str]]]:
        return [(t, m) for t, m in list(self.messages) if key in m and t >= since]

    def wait_for(self, key: str, timeout_s: float = 5.0) -> tuple[float, dict[str, str]]:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            found = self.with_key(key)
            if found:
                return found[0]
            time.sleep(0.01)
        raise AssertionError(f"no {key} within {timeout_s} s; got {self.messages[-5:]}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self.sock.close()


@pytest.fixture
def fake_systemd(tmp_path: Path) -> Iterator[tuple[FakeSystemd, str]]:
    path = str(tmp_path / "notify.sock")
    manager = FakeSystemd(path)
    yield manager, path
    manager.close()


def _tiny_model() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Sigmoid", ["x"], ["p"])], "damage",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["n", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


class StandInNode:
    """What the node does with systemd: READY=1 only once the model is loaded and the
    broker is connected; stages beat while they work; the pinger guards WATCHDOG=1."""

    STAGES = ("capture", "infer")

    def __init__(self, env: dict[str, str], broker_port: int, health: HealthFile) -> None:
        self.notifier = notifier = SystemdNotifier(env=env)
        self.stop = threading.Event()
        self.stall = {name: threading.Event() for name in self.STAGES}
        self.beats = StageHeartbeats(dict.fromkeys(self.STAGES, 0.2))
        self.pinger = WatchdogPinger(notifier, self.beats.stalled, health_file=health,
                                     summary=lambda: "running: 2 cameras, 0 items/s",
                                     env=env, stop=self.stop)
        self.session: ort.InferenceSession | None = None
        self.connected = threading.Event()
        self.state_at_ready: tuple[bool, bool] | None = None
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="stand-in")
        self.client.on_connect = self._on_connect
        self.client.reconnect_delay_set(1, 1)
        self.port = broker_port
        self.threads = [threading.Thread(target=self._stage, args=(n,), name=f"stage-{n}")
                        for n in self.STAGES]
        self.threads.append(threading.Thread(target=self._start_up, name="start-up"))

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object,
                    reason: ReasonCode, props: object) -> None:
        if not reason.is_failure:
            self.connected.set()

    def start(self) -> None:
        self.pinger.start()
        self.client.connect_async("127.0.0.1", self.port, keepalive=5)
        self.client.loop_start()
        for t in self.threads:
            t.start()

    def _start_up(self) -> None:
        self.session = ort.InferenceSession(_tiny_model(), providers=["CPUExecutionProvider"])
        self.session.run(None, {"x": np.zeros((1, 4), np.float32)})
        while not self.stop.is_set() and not self.connected.wait(0.02):
            pass
        if not self.stop.is_set():
            self.state_at_ready = (self.session is not None, self.connected.is_set())
            self.notifier.ready("ready: model loaded, broker connected")
            self.pinger.mark_ready()

    def _stage(self, name: str) -> None:
        while not self.stop.wait(0.01):
            if not self.stall[name].is_set():
                self.beats.beat(name)

    def shutdown(self) -> None:
        self.notifier.stopping("stopping")
        self.stop.set()
        self.pinger.stop()
        for t in self.threads:
            t.join(2.0)
        self.client.loop_stop()
        self.client.disconnect()


def test_notify_socket_ready_after_broker_and_models_then_watchdog_until_stall(
        fake_systemd: tuple[FakeSystemd, str], tmp_path: Path) -> None:
    """Under a NOTIFY_SOCKET, READY=1 comes only after the model is loaded AND the broker
    is connected (not while the broker is down); WATCHDOG=1 then arrives every
    WatchdogSec/2; when a stage stalls the pings stop and STATUS= names the stage; when
    it recovers they resume; shutdown sends STOPPING=1.

    The node's environment is passed explicitly rather than set on the test process:
    Debian's mosquitto speaks sd_notify too and would inherit NOTIFY_SOCKET."""
    manager, path = fake_systemd
    # WatchdogSec=0.1 s -> a ping every 50 ms
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"}
    broker = MosquittoBroker(tmp_path / "broker")  # not started yet: the broker is down
    health = HealthFile(tmp_path / "run" / "health.json", "1.2.3")
    node = StandInNode(env, broker.port, health)
    assert node.pinger.interval_s == pytest.approx(0.05)
    node.start()
    try:
        time.sleep(0.8)
        assert node.session is not None, "model should have loaded meanwhile"
        assert manager.with_key("READY") == [], "READY=1 while the broker was down"
        report = read_health(health.path)
        assert report is not None
        assert not report.ready

        broker.start()
        t_ready, ready = manager.wait_for("READY", timeout_s=10)
        assert ready["READY"] == "1"
        assert node.state_at_ready == (True, True)

        time.sleep(0.6)
        pings = [t for t, _ in manager.with_key("WATCHDOG", since=t_ready)]
        assert len(pings) >= 6
        assert max(np.diff(pings)) < 0.3  # regular: about every 50 ms
        report = read_health(health.path)
        assert report is not None
        assert report.ready
        assert report.healthy
        assert report.version == "1.2.3"

        node.stall["infer"].set()
        t_stall = time.monotonic()
        time.sleep(0.8)
        late = manager.with_key("WATCHDOG", since=t_stall + 0.35)  # 0.2 s limit + a tick
        assert late == [], "watchdog kept pinging while a stage was stalled"
        statuses = [m["STATUS"] for _, m in manager.with_key("STATUS", since=t_stall)]
        assert "STALLED: infer" in statuses
        report = read_health(health.path)
        assert report is not None
        assert report.stalled_stages == ("infer",)
        assert not report.healthy

        node.stall["infer"].clear()
        t_back = time.monotonic()
        # Pinging resumes; how soon depends on the machine's load (other tests beside it).
        deadline = t_back + 5.0
        while len(manager.with_key("WATCHDOG", since=t_back)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(manager.with_key("WATCHDOG", since=t_back)) >= 3
    finally:
        node.shutdown()
        broker.close()
    manager.wait_for("STOPPING")


def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """A NOTIFY_SOCKET starting with '@' is an abstract-namespace socket and works."""
    name = f"@cv-test-{time.monotonic_ns()}"
    manager = FakeSystemd(b"\0" + name[1:].encode())
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", name)
        notifier = SystemdNotifier()
        assert notifier.enabled
        assert notifier.status("building engines 3/5")
        _, msg = manager.wait_for("STATUS")
        assert msg["STATUS"] == "building engines 3/5"
    finally:
        manager.close()


def test_reloading_extend_timeout_and_stopping(fake_systemd: tuple[FakeSystemd, str]) -> None:
    """RELOADING=1 carries MONOTONIC_USEC on CLOCK_MONOTONIC (systemd >= 253 needs it);
    EXTEND_TIMEOUT_USEC carries the extension and a status line; multi-line status text
    is flattened so it cannot inject fields."""
    manager, path = fake_systemd
    notifier = SystemdNotifier(path)
    before = time.monotonic_ns() // 1000
    assert notifier.reloading()
    assert notifier.extend_timeout(90_000_000, "building engine damage.onnx: 40%")
    assert notifier.status("line one\nWATCHDOG=1")
    _, reload_msg = manager.wait_for("RELOADING")
    assert before <= int(reload_msg["MONOTONIC_USEC"]) <= time.monotonic_ns() // 1000
    _, ext = manager.wait_for("EXTEND_TIMEOUT_USEC")
    assert ext["EXTEND_TIMEOUT_USEC"] == "90000000"
    assert ext["STATUS"] == "building engine damage.onnx: 40%"
    time.sleep(0.1)
    assert manager.with_key("WATCHDOG") == []
    with pytest.raises(ValueError, match="usec must be > 0"):
        notifier.extend_timeout(0)
    notifier.close()


def test_without_notify_socket_everything_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run outside systemd (no NOTIFY_SOCKET): calls return False and nothing breaks."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = SystemdNotifier()
    assert not notifier.enabled
    assert not any([notifier.ready(), notifier.watchdog(), notifier.status("x"),
                    notifier.stopping(), notifier.reloading(), notifier.extend_timeout(1)])
    pinger = WatchdogPinger(notifier, lambda: (), env={"WATCHDOG_USEC": "100000"})
    assert not pinger.watchdog_enabled
    pinger.tick()
    assert pinger.pings == 0


def test_notify_to_a_vanished_manager_does_not_raise(tmp_path: Path) -> None:
    """If the socket is gone the notifier logs and returns False instead of raising."""
    notifier = SystemdNotifier(str(tmp_path / "gone.sock"))
    assert notifier.enabled
    assert not notifier.watchdog()


@pytest.mark.parametrize(("value", "expected"), [
    ("/run/systemd/notify", "/run/systemd/notify"),
    ("@abstract/name", b"\0abstract/name"),
    ("", None),
    ("relative.sock", None),
    ("vsock:2:1234", None),
])
def test_notify_address(value: str, expected: str | bytes | None) -> None:
    """Filesystem paths are used as is, '@' maps to the abstract namespace, the rest is
    not something this node can talk to."""
    assert notify_address(value) == expected


@pytest.mark.parametrize(("env", "pid", "expected"), [
    ({"WATCHDOG_USEC": "20000000"}, 42, 10.0),
    ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "42"}, 42, 10.0),
    ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "43"}, 42, None),
    ({"WATCHDOG_USEC": "0"}, 42, None),
    ({"WATCHDOG_USEC": "soon"}, 42, None),
    ({}, 42, None),
])
def test_watchdog_interval(env: dict[str, str], pid: int, expected: float | None) -> None:
    """Pings go every WatchdogSec/2, and only from the PID that WATCHDOG_PID names."""
    assert watchdog_interval_s(env, pid) == expected


def test_broken_health_callback_counts_as_stalled(fake_systemd: tuple[FakeSystemd, str]) -> None:
    """A health callback that raises must not look healthy: no ping, STATUS says so."""
    manager, path = fake_systemd

    def broken() -> tuple[str, ...]:
        raise RuntimeError("queue gone")

    pinger = WatchdogPinger(SystemdNotifier(path), broken, env={"WATCHDOG_USEC": "100000"})
    assert pinger.tick() == ("health-check",)
    _, msg = manager.wait_for("STATUS")
    assert msg["STATUS"] == "STALLED: health-check"
    assert manager.with_key("WATCHDOG") == []
    assert pinger.pings == 0


def test_health_file_is_replaced_atomically(tmp_path: Path) -> None:
    """The health file is always complete JSON with the agreed fields (the updater reads
    it while the node writes it), readable by other users, and placed in
    $RUNTIME_DIRECTORY under systemd."""
    path = health_file_path(tmp_path / "state", {"RUNTIME_DIRECTORY": str(tmp_path / "run")})
    assert path == tmp_path / "run" / "health.json"
    assert health_file_path(tmp_path / "state", {}) == tmp_path / "state" / "health.json"
    health = HealthFile(path, "2.0.0")
    stop = threading.Event()
    bad: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            if path.exists() and read_health(path) is None:
                bad.append(path.read_text())

    t = threading.Thread(target=reader, name="reader")
    t.start()
    for i in range(300):
        health.write(ready=i > 10, stalled_stages=("sync",) if i % 7 == 0 else ())
    stop.set()
    t.join(2)
    assert bad == []
    data = json.loads(path.read_text())
    assert set(data) == {"version", "ready", "healthy", "stalled_stages", "updated_ms", "pid"}
    assert path.stat().st_mode & 0o777 == 0o644
    assert list(path.parent.glob(".*tmp")) == []
