"""`edge-node update …` commands and tools/make_bundle.py, end to end in a temp root."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from edge.commands.update import main
from edge.update import updater
from edge.update.bundle import BundleError
from edge.update.store import ReleaseStore
from edge.update.updater import build_venv

from .conftest import BundleFactory

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str | Path) -> int:
    return main(["update", *map(str, args)])


def test_apply_status_and_rollback_from_the_command_line(
        make_bundle: BundleFactory, public_key_file: Path, root: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`update apply --no-restart` installs and commits; `update status --json` shows
    current, previous and the last event; `update rollback` goes back; exit codes say
    what happened."""
    common = ("--root", root, "--public-key", public_key_file, "--no-restart")
    assert _cli("apply", make_bundle("1.0.0"), *common) == 0
    assert _cli("apply", make_bundle("1.1.0"), *common) == 0
    assert "update committed: 1.1.0" in capsys.readouterr().out
    assert _cli("status", "--root", root, "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["current"], status["previous"]) == ("1.1.0", "1.0.0")
    assert [r["version"] for r in status["releases"]] == ["1.0.0", "1.1.0"]
    assert status["last_event"]["outcome"] == "committed"
    assert _cli("rollback", "--root", root, "--no-restart", "--reason", "bad shift") == 0
    assert ReleaseStore(root).current_version() == "1.0.0"
    assert _cli("status", "--root", root) == 0
    text = capsys.readouterr().out
    assert "current:  1.0.0" in text
    assert "rolled_back" in text
    assert "bad shift" in text


def test_refused_bundle_exits_1_and_says_why(
        make_bundle: BundleFactory, public_key_file: Path, root: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A truncated bundle exits 1 with the reason on stderr; nothing is installed."""
    good = make_bundle("1.0.0")
    cut = tmp_path / "cut.cvb"
    cut.write_bytes(good.read_bytes()[:500])
    assert _cli("apply", cut, "--root", root, "--public-key", public_key_file,
                "--no-restart") == 1
    assert "update refused:" in capsys.readouterr().err
    assert ReleaseStore(root).installed() == []


def test_downgrade_exits_1_naming_both_versions_unless_allowed(
        make_bundle: BundleFactory, public_key_file: Path, root: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`update apply` of a bundle older than the newest release installed (its own release
    pruned) exits 1 and says which versions and how to override; `--allow-downgrade`
    installs it; `update status --json` shows the newest version installed."""
    common = ("--root", root, "--public-key", public_key_file, "--no-restart", "--keep", "2")
    old = make_bundle("1.0.0")
    for bundle in (old, make_bundle("1.1.0"), make_bundle("1.2.0")):
        assert _cli("apply", bundle, *common) == 0
    capsys.readouterr()
    assert _cli("apply", old, *common) == 1
    err = capsys.readouterr().err
    assert "update refused: release 1.0.0 is older than 1.2.0" in err
    assert "edge-node update apply --allow-downgrade" in err
    assert ReleaseStore(root).current_version() == "1.2.0"
    assert _cli("apply", old, *common, "--allow-downgrade") == 0
    assert ReleaseStore(root).current_version() == "1.0.0"
    capsys.readouterr()
    assert _cli("status", "--root", root, "--json") == 0
    assert json.loads(capsys.readouterr().out)["highest_installed"] == "1.2.0"


def test_inbox_applies_the_newest_bundle_and_files_all_as_processed(
        make_bundle: BundleFactory, public_key_file: Path, root: Path, tmp_path: Path) -> None:
    """Given an inbox folder (what the timer passes), the newest bundle is applied and
    every bundle moves to processed/, so the next run has nothing to do."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for n, version in enumerate(["1.0.0", "1.1.0"]):
        b = make_bundle(version)
        os.utime(b, (time.time() - 100 + n, time.time() - 100 + n))  # settled
        b.replace(inbox / b.name)
    args = ("--root", root, "--public-key", public_key_file, "--no-restart")
    assert _cli("apply", inbox, *args) == 0
    assert ReleaseStore(root).current_version() == "1.1.0"
    assert sorted(p.name for p in (inbox / "processed").iterdir()) == [
        "cv-1.0.0.cvb", "cv-1.1.0.cvb"]
    assert _cli("apply", inbox, *args) == 0  # empty inbox: nothing to do


def test_a_bundle_still_arriving_or_a_busy_updater_leaves_the_inbox_alone(
        make_bundle: BundleFactory, public_key_file: Path, root: Path, tmp_path: Path) -> None:
    """A bundle written to in the last `--settle` seconds may be a copy in progress, and
    while another update holds the lock nothing is looked at: such bundles stay in the
    inbox for the next run (they used to be filed as processed, never applied)."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    bundle = make_bundle("1.0.0").replace(inbox / "cv-1.0.0.cvb")
    args = ("--root", root, "--public-key", public_key_file, "--no-restart")
    assert _cli("apply", inbox, *args) == 0  # just written: settling
    assert bundle.exists()
    assert ReleaseStore(root).current_version() is None
    os.utime(bundle, (time.time() - 100, time.time() - 100))
    ReleaseStore(root).ensure_layout()
    with (root / ".update.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # an operator's update is running
        assert _cli("apply", inbox, *args) == 1
    assert bundle.exists()
    assert _cli("apply", inbox, *args) == 0
    assert ReleaseStore(root).current_version() == "1.0.0"
    assert not bundle.exists()


def test_an_interrupted_update_is_finished_even_when_the_inbox_is_empty(
        make_bundle: BundleFactory, public_key_file: Path, root: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A reboot during the health gate of a hand-applied update: the timer's next run finds
    no bundle, and still gates the pending release (here it never reports healthy, so it is
    rolled back). It used to wait for the next bundle. The node's config is not read when
    there is nothing to install: one the node itself refuses does not keep it waiting."""
    common = ("--root", root, "--public-key", public_key_file, "--no-restart")
    assert _cli("apply", make_bundle("1.0.0"), *common) == 0
    assert _cli("apply", make_bundle("1.1.0"), *common) == 0
    store = ReleaseStore(root)
    store.set_pending("1.1.0", "1.0.0")  # the state a reboot mid-gate leaves
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    broken = tmp_path / "config.yaml"
    broken.write_text("update: {shadow_gate: {min_agreement: 7}}\n")
    assert _cli("apply", inbox, *common, "--health-file", tmp_path / "none.json",
                "--ready-timeout", "0.3", "--poll", "0.05", "--config", broken) == 1
    assert "update resumed: rolled_back 1.1.0" in capsys.readouterr().out
    assert store.current_version() == "1.0.0"
    assert store.pending() is None


def test_make_bundle_tool_round_trip(tmp_path: Path, root: Path) -> None:
    """tools/make_bundle.py makes a key pair and a signed bundle that the device's
    `update apply` accepts with that public key."""
    tool = [sys.executable, str(REPO / "tools" / "make_bundle.py")]
    priv, pub = tmp_path / "signing.pem", tmp_path / "signing.pub"
    subprocess.run([*tool, "keygen", "--private", priv, "--public", pub], check=True,
                   capture_output=True)
    assert priv.stat().st_mode & 0o777 == 0o600
    stage = tmp_path / "stage"
    (stage / "engines").mkdir(parents=True)
    (stage / "engines" / "manifest.yaml").write_text("models: {}\n")
    (stage / "config").mkdir()
    (stage / "config" / "default.yaml").write_text("node: {}\n")
    out = tmp_path / "dist" / "cv-2.0.0.cvb"
    done = subprocess.run([*tool, "build", "--version", "2.0.0", "--key", priv, "--out", out,
                           stage], check=True, capture_output=True, text=True)
    assert "full release 2.0.0, 2 files" in done.stdout
    assert _cli("apply", out, "--root", root, "--public-key", pub, "--no-restart") == 0
    assert (root / "current" / "engines" / "manifest.yaml").read_text() == "models: {}\n"


def _wheel(dist: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel (what `pip wheel` makes for a package)."""
    path = dist / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n",
    }
    record = "".join(f"{n},,\n" for n in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as zf:
        for n, data in files.items():
            zf.writestr(n, data)
        zf.writestr(f"{info}/RECORD", record)
    return path


@pytest.mark.slow
def test_full_release_gets_its_own_offline_venv(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A full release's wheels are installed offline into releases/<v>/venv, which also
    sees the system site-packages (JetPack's TensorRT and OpenCV on a Jetson)."""
    release = tmp_path / "releases" / "3.0.0"
    (release / "wheels").mkdir(parents=True)
    _wheel(release / "wheels", "cvprobe", "3.0.0")
    monkeypatch.setenv("CONVEYOR_VISION_PYTHON", "/usr/bin/python3")
    build_venv(release)
    python = release / "venv" / "bin" / "python"
    out = subprocess.run([python, "-c", "import cvprobe, sys; print(cvprobe.VERSION, sys.prefix)"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["3.0.0", str(release / "venv")]
    cfg = (release / "venv" / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = true" in cfg


def test_a_venv_build_that_hangs_is_stopped_and_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The venv build has one bound for all its steps (what the update unit's timeout is
    sized on): a step still running then is killed and the release refused with that
    reason, instead of an unhandled TimeoutExpired (or systemd killing the update)."""
    release = tmp_path / "releases" / "3.0.0"
    (release / "wheels").mkdir(parents=True)
    _wheel(release / "wheels", "cvprobe", "3.0.0")
    hang = tmp_path / "python3"
    hang.write_text("#!/bin/sh\nexec sleep 30\n")
    hang.chmod(0o755)
    monkeypatch.setenv("CONVEYOR_VISION_PYTHON", str(hang))
    monkeypatch.setattr(updater, "VENV_BUILD_TIMEOUT_S", 0.5)
    start = time.monotonic()
    with pytest.raises(BundleError, match=r"building the venv took longer than 0\.5 s"):
        build_venv(release)
    assert time.monotonic() - start < 10
