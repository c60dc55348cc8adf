"""Fixtures for the update tests: signing keys, bundle factory, and a stand-in node.

`FakeNode` plays the node the way systemd would run it: on restart it resolves
`<root>/current` (as `running_release_version` does under `$CONVEYOR_VISION_ROOT`) and
behaves as that release's `config/behaviour` file says, writing the real health file
through `edge.health_file.HealthFile`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge.health_file import HealthFile
from edge.update.bundle import Kind, build_manifest, write_bundle
from edge.update.health import GatePolicy, HealthFileProbe, HealthProbe
from edge.update.store import ReleaseStore, running_release_version
from edge.update.updater import UpdatePolicy, Updater

FAST_GATE = GatePolicy(ready_timeout_s=1.0, healthy_for_s=0.3, poll_s=0.03)


@pytest.fixture
def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def public_key_file(tmp_path: Path, signing_key: Ed25519PrivateKey) -> Path:
    path = tmp_path / "update-signing.pub"
    path.write_bytes(signing_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


BundleFactory = Callable[..., Path]


@pytest.fixture
def make_bundle(tmp_path: Path, signing_key: Ed25519PrivateKey) -> BundleFactory:
    """make_bundle(version, kind='full', files=None, behaviour='healthy', key=None) -> path."""
    out_dir = tmp_path / "bundles"
    out_dir.mkdir()

    def factory(version: str, kind: Kind = "full", *, files: dict[str, bytes] | None = None,
                behaviour: str = "healthy", key: Ed25519PrivateKey | None = None,
                base_version: str | None = None) -> Path:
        payload = tmp_path / "payloads" / version
        if files is None:
            files = {
                "engines/manifest.yaml": f"models for {version}\n".encode(),
                "engines/damage.onnx": version.encode() * 1000,
            }
            if kind == "full":
                files["config/behaviour"] = behaviour.encode()
                files["config/default.yaml"] = b"node: {node_id: edge-01}\n"
        for rel, data in files.items():
            p = payload / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        manifest = build_manifest(payload, version, kind, base_version)
        return write_bundle(payload, manifest, key or signing_key, out_dir / f"cv-{version}.cvb")

    return factory


class FakeServices:
    """Records unit operations; restarting the node unit (re)starts the fake node."""

    def __init__(self, node: FakeNode) -> None:
        self.node = node
        self.calls: list[tuple[str, str]] = []

    def restart(self, unit: str) -> None:
        self.calls.append(("restart", unit))
        if unit == "conveyor-vision.service":
            self.node.restart()

    def start(self, unit: str) -> None:
        self.calls.append(("start", unit))


class FakeNode:
    """Runs the release `current` points at, as its config/behaviour file says:
    'healthy', 'never-ready', or 'stall-after-ready'."""

    def __init__(self, root: Path, health_path: Path) -> None:
        self.root = root
        self.health_path = health_path
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.versions_run: list[str] = []

    def restart(self) -> None:
        self.stop()
        self._stop = threading.Event()
        version = running_release_version("unknown", {"CONVEYOR_VISION_ROOT": str(self.root)})
        self.versions_run.append(version)
        self._thread = threading.Thread(target=self._run, args=(version, self._stop),
                                        name="fake-node", daemon=True)
        self._thread.start()

    def _run(self, version: str, stop: threading.Event) -> None:
        behaviour_file = self.root / "current" / "config" / "behaviour"
        behaviour = behaviour_file.read_text() if behaviour_file.exists() else "healthy"
        health = HealthFile(self.health_path, version)
        ticks = 0
        while not stop.is_set():
            ready = behaviour != "never-ready" and ticks >= 2
            stalled = ("infer",) if behaviour == "stall-after-ready" and ticks >= 6 else ()
            health.write(ready=ready, stalled_stages=stalled)
            ticks += 1
            stop.wait(0.02)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "opt-conveyor-vision"


@pytest.fixture
def fake_node(root: Path, tmp_path: Path) -> Iterator[FakeNode]:
    node = FakeNode(root, tmp_path / "run" / "health.json")
    yield node
    node.stop()


@pytest.fixture
def services(fake_node: FakeNode) -> FakeServices:
    return FakeServices(fake_node)


def fake_venv(release_dir: Path) -> None:
    """Stands in for build_venv: a venv folder that names its release."""
    (release_dir / "venv" / "bin").mkdir(parents=True)
    (release_dir / "venv" / "bin" / "built-for").write_text(release_dir.name)


UpdaterFactory = Callable[..., Updater]


@pytest.fixture
def make_updater(root: Path, signing_key: Ed25519PrivateKey, services: FakeServices,
                 fake_node: FakeNode) -> UpdaterFactory:
    def factory(*, keep: int = 3, gate: GatePolicy = FAST_GATE,
                keys: list[Ed25519PublicKey] | None = None) -> Updater:
        def probe_for(version: str) -> HealthProbe:
            return HealthFileProbe(fake_node.health_path, version, max_age_s=0.5)
        return Updater(root, public_keys=keys or [signing_key.public_key()], services=services,
                       probe_for=probe_for, policy=UpdatePolicy(keep=keep, gate=gate),
                       env_builder=fake_venv)
    return factory


def tree(root: Path) -> list[tuple[str, str]]:
    return list(ReleaseStore(root).iter_tree())
