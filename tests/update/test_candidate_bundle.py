"""tools/make_bundle.py packs a candidate model folder (laid out as engines/) into a signed
models bundle the device installs; a candidate whose files do not match its manifest is
refused before anything is signed."""

from __future__ import annotations

import shutil
import sys
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.config import DEFAULT_MANIFEST
from edge.infer.manifest import load_manifest, sha256_file
from edge.update.bundle import load_public_keys
from edge.update.store import ReleaseStore

from .conftest import BundleFactory, UpdaterFactory

TOOLS = Path(__file__).resolve().parents[2] / "tools"
sys.path.insert(0, str(TOOLS))

import make_bundle as bundle_tool  # noqa: E402


@pytest.fixture
def candidate(tmp_path: Path) -> Path:
    """A models folder as `edge-node train --out` leaves it: the layout of engines/."""
    folder = tmp_path / "candidate"
    shutil.copytree(DEFAULT_MANIFEST.parent, folder)
    return folder


@pytest.fixture
def key(tmp_path: Path) -> Path:
    private = tmp_path / "signing.pem"
    assert bundle_tool.main(["keygen", "--private", str(private), "--public",
                             str(tmp_path / "signing.pub")]) == 0
    return private


def test_candidate_folder_becomes_a_models_bundle_the_device_installs(
        candidate: Path, key: Path, tmp_path: Path, make_updater: UpdaterFactory,
        make_bundle: BundleFactory, root: Path, capsys: pytest.CaptureFixture[str],
        signing_key: Ed25519PrivateKey) -> None:
    """Every file of the candidate goes under engines/ in the bundle; the tool prints the
    manifest's sha256 (the key of the device's shadow record); installed as a models
    release over a full one, the device's engines/ is the candidate, byte for byte, and its
    manifest verifies."""
    out = tmp_path / "cv-1.0.0+m1.cvb"
    capsys.readouterr()
    assert bundle_tool.main(["build", "--kind", "models", "--base-version", "1.0.0",
                             "--version", "1.0.0+m1", "--key", str(key), "--out", str(out),
                             str(candidate)]) == 0
    said = capsys.readouterr().out
    sha = sha256_file(candidate / "manifest.yaml")
    assert f"models manifest sha256 {sha}" in said
    files = sorted(p.relative_to(candidate).as_posix() for p in candidate.rglob("*")
                   if p.is_file())
    with tarfile.open(out) as tf:
        packed = sorted(n.removeprefix("payload/") for n in tf.getnames()
                        if n.startswith("payload/"))
    assert packed == [f"engines/{f}" for f in files]
    # The base release is signed by the fixture's key, the candidate by the tool's.
    updater = make_updater(keys=[signing_key.public_key(),
                                 *load_public_keys(key.with_name("signing.pub"))])
    updater.apply(make_bundle("1.0.0"), restart=False)
    updater.apply(out, restart=False)
    installed = root / "current" / "engines"
    assert ReleaseStore(root).current_version() == "1.0.0+m1"
    for rel in files:
        assert (installed / rel).read_bytes() == (candidate / rel).read_bytes()
    assert load_manifest(installed / "manifest.yaml").version == load_manifest(
        candidate / "manifest.yaml").version


@pytest.mark.parametrize(("spoil", "says"), [
    ("damage/damage.onnx", "sha256 is"),
    ("golden/golden.npz", "not the sha256"),
])
def test_a_candidate_that_does_not_match_its_manifest_is_not_bundled(
        candidate: Path, key: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        spoil: str, says: str) -> None:
    """A model or golden file changed after its manifest was written: exit 1 with the file
    named, and no bundle."""
    with (candidate / spoil).open("ab") as fh:
        fh.write(b"\0")
    out = tmp_path / "cv.cvb"
    assert bundle_tool.main(["build", "--kind", "models", "--version", "1.0.0+m1", "--key",
                             str(key), "--out", str(out), str(candidate)]) == 1
    err = capsys.readouterr().err
    assert says in err
    assert Path(spoil).name in err
    assert not out.exists()


def test_a_candidate_folder_is_only_a_models_release(
        candidate: Path, key: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Built as a full release it would replace the device's software with nothing: refused."""
    assert bundle_tool.main(["build", "--version", "2.0.0", "--key", str(key), "--out",
                             str(tmp_path / "cv.cvb"), str(candidate)]) == 1
    assert "build it with --kind models" in capsys.readouterr().err
