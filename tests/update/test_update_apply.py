"""Applying bundles in a temporary root: install, commit, refuse, roll back, retain."""

from __future__ import annotations

import base64
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.infer.manifest import sha256_file
from edge.update.bundle import (
    BundleManifest,
    FileEntry,
    Kind,
    release_order,
    write_bundle,
)
from edge.update.store import ReleaseStore
from edge.update.updater import ENGINES_UNIT, NODE_UNIT, UpdateError

from .conftest import BundleFactory, FakeNode, FakeServices, UpdaterFactory


def _rewrite(bundle: Path, out: Path, edit: dict[str, bytes | None]) -> Path:
    """Copy a bundle member by member, replacing (or dropping, None) the named members."""
    with tarfile.open(bundle, "r:*") as src, tarfile.open(out, "w:gz") as dst:
        for m in src.getmembers():
            handle = src.extractfile(m) if m.isfile() else None
            data = handle.read() if handle is not None else b""
            if m.name in edit:
                replacement = edit[m.name]
                if replacement is None:
                    continue
                data = replacement
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    return out


@pytest.fixture
def installed_v1(make_updater: UpdaterFactory, make_bundle: BundleFactory) -> str:
    make_updater().apply(make_bundle("1.0.0"))
    return "1.0.0"


def test_good_bundle_installs_and_commits(*, make_updater: UpdaterFactory,
                                          make_bundle: BundleFactory,
                                          root: Path, services: FakeServices,
                                          fake_node: FakeNode, installed_v1: str,
                                          signing_key: Ed25519PrivateKey) -> None:
    """A signed bundle is installed under releases/<v>, `current` switches to it, the node
    is restarted, and once it is READY and healthy for the gate time the update commits
    with the old release kept as `previous`."""
    event = make_updater().apply(make_bundle("1.1.0"))
    store = ReleaseStore(root)
    assert event.outcome == "committed"
    assert event.version == "1.1.0"
    assert event.previous == installed_v1
    assert os.readlink(root / "current") == "releases/1.1.0"
    assert store.previous_version() == "1.0.0"
    assert (root / "current" / "engines" / "damage.onnx").read_bytes() == b"1.1.0" * 1000
    assert fake_node.versions_run == ["1.0.0", "1.1.0"]
    assert services.calls[-1] == ("restart", NODE_UNIT)
    info = store.info("1.1.0")
    assert info is not None
    assert info.status == "committed"
    assert "healthy for" in info.reason
    # The kept manifest is the exact signed one: the release can be re-verified later.
    raw = (root / "current" / "release.json").read_bytes()
    sig = base64.b64decode((root / "current" / "manifest.sig").read_bytes())
    signing_key.public_key().verify(sig, raw)
    assert store.last_event() == event
    assert store.pending() is None


def test_first_install_on_an_empty_root_commits(*, make_updater: UpdaterFactory,
                                                make_bundle: BundleFactory, root: Path) -> None:
    """The very first release needs no previous one: it installs, gates and commits."""
    event = make_updater().apply(make_bundle("0.9.0"))
    assert event.outcome == "committed"
    assert event.previous is None
    assert ReleaseStore(root).current_version() == "0.9.0"


def _signed_bundle(payload: Path, rel: str, content: bytes, version: str, kind: Kind,
                   key: Ed25519PrivateKey) -> Path:
    """A correctly signed bundle of one file, with a manifest the bundle factory would not
    write (a version or a payload the device must refuse)."""
    (payload / rel).parent.mkdir(parents=True)
    (payload / rel).write_bytes(content)
    manifest = BundleManifest(version, kind, (FileEntry(rel, sha256_file(payload / rel),
                                                  len(content)),))
    return write_bundle(payload, manifest, key, payload.with_suffix(".cvb"))


def _tampered_payload(bundle: Path, tmp: Path) -> Path:
    data = bytearray(b"1.1.0" * 1000)
    data[100] ^= 0xFF  # same size, different content
    return _rewrite(bundle, tmp / "hash.cvb", {"payload/engines/damage.onnx": bytes(data)})


def _truncated_payload_file(bundle: Path, tmp: Path) -> Path:
    return _rewrite(bundle, tmp / "short.cvb",
                    {"payload/engines/damage.onnx": (b"1.1.0" * 1000)[:1234]})


def _truncated_archive(bundle: Path, tmp: Path) -> Path:
    out = tmp / "cut.cvb"
    out.write_bytes(bundle.read_bytes()[: bundle.stat().st_size // 2])
    return out


def _extra_file(bundle: Path, tmp: Path) -> Path:
    out = tmp / "extra.cvb"
    with tarfile.open(bundle, "r:*") as src, tarfile.open(out, "w:gz") as dst:
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m))
        evil = tarfile.TarInfo("payload/venv/bin/edge-node")
        evil.size = 3
        dst.addfile(evil, io.BytesIO(b"rm!"))
    return out


def _missing_file(bundle: Path, tmp: Path) -> Path:
    return _rewrite(bundle, tmp / "missing.cvb", {"payload/engines/manifest.yaml": None})


def _symlink_member(bundle: Path, tmp: Path) -> Path:
    out = tmp / "link.cvb"
    with tarfile.open(bundle, "r:*") as src, tarfile.open(out, "w:gz") as dst:
        for m in src.getmembers():
            if m.name == "payload/engines/manifest.yaml":
                link = tarfile.TarInfo(m.name)
                link.type = tarfile.SYMTYPE
                link.linkname = "/etc/shadow"
                dst.addfile(link)
            else:
                dst.addfile(m, src.extractfile(m))
    return out


def _unsigned(bundle: Path, tmp: Path) -> Path:
    return _rewrite(bundle, tmp / "unsigned.cvb", {"manifest.sig": None})


@pytest.mark.parametrize(("damage", "reason"), [
    (_tampered_payload, "sha256 mismatch"),
    (_truncated_payload_file, "bytes, manifest says"),
    (_truncated_archive, "truncated archive"),
    (_extra_file, "does not list"),
    (_missing_file, "missing from the archive"),
    (_symlink_member, "not a regular file"),
    (_unsigned, "no manifest.sig"),
])
def test_damaged_bundle_is_refused_with_nothing_changed(
        *, damage: object, reason: str, make_updater: UpdaterFactory, make_bundle: BundleFactory,
        root: Path, services: FakeServices, installed_v1: str, tmp_path: Path) -> None:
    """A bundle with a wrong hash, a truncated file or archive, an extra, missing or linked
    file is refused: releases, links and state are byte-for-byte as before, no unit is
    touched, and the refusal is reported."""
    bad = damage(make_bundle("1.1.0"), tmp_path)  # type: ignore[operator]
    before = list(ReleaseStore(root).iter_tree())
    calls = list(services.calls)
    with pytest.raises(UpdateError, match=reason) as err:
        make_updater().apply(bad)
    assert err.value.event.outcome == "refused"
    assert list(ReleaseStore(root).iter_tree()) == before
    assert services.calls == calls
    assert ReleaseStore(root).current_version() == installed_v1
    last = ReleaseStore(root).last_event()
    assert last is not None
    assert last.outcome == "refused"
    assert reason in last.reason


def test_bad_signature_is_refused_with_nothing_changed(
        *, make_updater: UpdaterFactory, make_bundle: BundleFactory, root: Path,
        installed_v1: str) -> None:
    """A bundle signed by a key the device does not trust is refused before anything is
    unpacked."""
    before = list(ReleaseStore(root).iter_tree())
    rogue = make_bundle("1.1.0", key=Ed25519PrivateKey.generate())
    with pytest.raises(UpdateError, match="bad signature"):
        make_updater().apply(rogue)
    assert list(ReleaseStore(root).iter_tree()) == before


def test_manifest_edited_after_signing_is_refused(
        *, make_updater: UpdaterFactory, make_bundle: BundleFactory, root: Path,
        installed_v1: str, tmp_path: Path) -> None:
    """Changing one byte of the signed manifest (e.g. to match a swapped file) breaks the
    signature."""
    bundle = make_bundle("1.1.0")
    with tarfile.open(bundle) as tf:
        raw = tf.extractfile("manifest.json").read()  # type: ignore[union-attr]
    edited = _rewrite(bundle, tmp_path / "edited.cvb",
                      {"manifest.json": raw.replace(b'"1.1.0"', b'"1.1.1"')})
    before = list(ReleaseStore(root).iter_tree())
    with pytest.raises(UpdateError, match="bad signature"):
        make_updater().apply(edited)
    assert list(ReleaseStore(root).iter_tree()) == before


def test_release_that_never_becomes_ready_is_rolled_back(
        *, make_updater: UpdaterFactory, make_bundle: BundleFactory, root: Path,
        services: FakeServices, fake_node: FakeNode, installed_v1: str) -> None:
    """A release whose node never reports READY within the timeout is switched back by
    the updater itself; `current` is the old release again, the old node runs, and the
    reason is recorded for the status topic."""
    with pytest.raises(UpdateError, match="not READY within") as err:
        make_updater().apply(make_bundle("1.1.0", behaviour="never-ready"))
    store = ReleaseStore(root)
    assert err.value.event.outcome == "rolled_back"
    assert store.current_version() == installed_v1
    assert fake_node.versions_run == ["1.0.0", "1.1.0", "1.0.0"]
    assert services.calls[-1] == ("restart", NODE_UNIT)
    info = store.info("1.1.0")
    assert info is not None
    assert info.status == "rolled_back"
    last = store.last_event()
    assert last is not None
    assert last.outcome == "rolled_back"
    assert last.version == "1.1.0"
    assert last.previous == "1.0.0"
    assert "READY" in last.reason
    assert store.pending() is None


def test_release_that_stalls_after_ready_is_rolled_back(
        *, make_updater: UpdaterFactory, make_bundle: BundleFactory, root: Path,
        installed_v1: str) -> None:
    """READY is not enough: a stage that stalls during the healthy window rolls back,
    and the reason names the stalled stage."""
    with pytest.raises(UpdateError, match="stalled stages: infer"):
        make_updater().apply(make_bundle("1.1.0", behaviour="stall-after-ready"))
    assert ReleaseStore(root).current_version() == installed_v1


def test_same_version_twice_is_refused(*, make_updater: UpdaterFactory, make_bundle: BundleFactory,
                                       installed_v1: str) -> None:
    """Re-applying an installed version is refused (versions are immutable)."""
    with pytest.raises(UpdateError, match="already installed"):
        make_updater().apply(make_bundle(installed_v1))


def test_keeps_k_releases(*, make_updater: UpdaterFactory, make_bundle: BundleFactory,
                          root: Path) -> None:
    """With keep=3, after five updates only the newest three remain; `current` and
    `previous` are among them."""
    updater = make_updater(keep=3)
    for minor in range(5):
        updater.apply(make_bundle(f"1.{minor}.0"))
    store = ReleaseStore(root)
    assert sorted(p.name for p in store.releases.iterdir()) == ["1.2.0", "1.3.0", "1.4.0"]
    assert (store.current_version(), store.previous_version()) == ("1.4.0", "1.3.0")


def test_rolled_back_release_is_pruned_first(*, make_updater: UpdaterFactory,
                                             make_bundle: BundleFactory, root: Path) -> None:
    """A release that failed its gate does not take a retention slot from good ones."""
    updater = make_updater(keep=3)
    updater.apply(make_bundle("1.0.0"))
    updater.apply(make_bundle("1.1.0"))
    with pytest.raises(UpdateError):
        updater.apply(make_bundle("1.2.0", behaviour="never-ready"))
    updater.apply(make_bundle("1.3.0"))
    assert sorted(p.name for p in ReleaseStore(root).releases.iterdir()) == [
        "1.0.0", "1.1.0", "1.3.0"]


def test_models_only_update_reuses_the_venv_and_rebuilds_engines(
        *, make_updater: UpdaterFactory, make_bundle: BundleFactory, root: Path,
        services: FakeServices, installed_v1: str) -> None:
    """A models bundle makes a new release with the new ONNX and manifest, the rest of the
    running release (config) and its venv shared; the engine unit is started before the
    node restarts; the old release's models are untouched."""
    new_model = b"retrained" * 500
    services.calls.clear()
    event = make_updater().apply(make_bundle(
        "1.0.0+m1", kind="models", base_version="1.0.0",
        files={"engines/damage.onnx": new_model, "engines/manifest.yaml": b"v2 models\n"}))
    assert event.outcome == "committed"
    new, old = root / "releases" / "1.0.0+m1", root / "releases" / "1.0.0"
    assert (new / "engines" / "damage.onnx").read_bytes() == new_model
    assert (old / "engines" / "damage.onnx").read_bytes() == b"1.0.0" * 1000
    assert (new / "config" / "behaviour").read_text() == "healthy"
    assert os.readlink(new / "venv") == "../1.0.0/venv"
    assert (new / "venv" / "bin" / "built-for").read_text() == "1.0.0"
    assert services.calls == [("start", ENGINES_UNIT), ("restart", NODE_UNIT)]


def test_models_release_keeps_the_release_that_owns_its_venv(
        *, make_updater: UpdaterFactory, make_bundle: BundleFactory, root: Path) -> None:
    """Retention never removes the release whose venv a kept models release runs."""
    updater = make_updater(keep=2)
    updater.apply(make_bundle("1.0.0"))
    for n in range(1, 4):
        updater.apply(make_bundle(f"1.0.0+m{n}", kind="models",
                                  files={"engines/damage.onnx": bytes([n]) * 10}))
    names = sorted(p.name for p in ReleaseStore(root).releases.iterdir())
    assert names == ["1.0.0", "1.0.0+m2", "1.0.0+m3"]
    assert (root / "current" / "venv" / "bin" / "built-for").read_text() == "1.0.0"


def test_models_bundle_for_another_release_is_refused(
        *, make_updater: UpdaterFactory, make_bundle: BundleFactory, root: Path,
        installed_v1: str) -> None:
    """A models bundle built for release X does not apply on top of release Y."""
    before = list(ReleaseStore(root).iter_tree())
    with pytest.raises(UpdateError, match=r"is for release 2\.0\.0"):
        make_updater().apply(make_bundle("2.0.0+m1", kind="models", base_version="2.0.0",
                                         files={"engines/damage.onnx": b"x"}))
    assert list(ReleaseStore(root).iter_tree()) == before


def test_models_bundle_may_not_carry_code(
        *, make_updater: UpdaterFactory, signing_key: Ed25519PrivateKey, root: Path,
        installed_v1: str, tmp_path: Path) -> None:
    """Even correctly signed, a models bundle with files outside engines/ is refused."""
    bundle = _signed_bundle(tmp_path / "evil", "venv/x.py", b"import os", "1.0.0+m9",
                            "models", signing_key)
    with pytest.raises(UpdateError, match="only carry files under engines/"):
        make_updater().apply(bundle)


def test_interrupted_update_is_finished_after_reboot(
        *, make_updater: UpdaterFactory, make_bundle: BundleFactory, root: Path,
        fake_node: FakeNode, installed_v1: str) -> None:
    """If the updater dies after switching (power cut), the next run gates the pending
    release: here it never becomes READY, so it is rolled back."""
    store = ReleaseStore(root)
    updater = make_updater()
    # Install 1.1.0 without a gate, then fake the crash state: pending + switched.
    updater.apply(make_bundle("1.1.0", behaviour="never-ready"), restart=False)
    store.set_pending("1.1.0", "1.0.0")
    fake_node.restart()  # the node comes up on the new release after the reboot
    event = updater.resume()
    assert event is not None
    assert event.outcome == "rolled_back"
    assert store.current_version() == "1.0.0"
    assert store.pending() is None


def test_a_rollback_whose_records_cannot_be_written_still_switches_back(
        *, make_updater: UpdaterFactory, make_bundle: BundleFactory, root: Path,
        fake_node: FakeNode, installed_v1: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk full while the gate rolls back: the release's record cannot be written, and the
    device still goes back to the release that worked (it used to stay on the failed one,
    with the node not restarted)."""
    original = ReleaseStore.mark

    def full_disk(self: ReleaseStore, version: str, status: str, *a: object, **k: object) -> None:
        if status == "rolled_back":
            raise OSError(28, "No space left on device")
        original(self, version, status, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(ReleaseStore, "mark", full_disk)
    with pytest.raises(UpdateError, match="not READY within"):
        make_updater().apply(make_bundle("1.1.0", behaviour="never-ready"))
    assert ReleaseStore(root).current_version() == installed_v1
    assert fake_node.versions_run[-1] == installed_v1


def test_operator_rollback_goes_to_previous(*, make_updater: UpdaterFactory,
                                            make_bundle: BundleFactory, root: Path,
                                            fake_node: FakeNode, installed_v1: str) -> None:
    """`update rollback` switches back to `previous`, restarts the node and reports it."""
    updater = make_updater()
    updater.apply(make_bundle("1.1.0"))
    event = updater.rollback("operator saw false sidelines")
    assert event.outcome == "rolled_back"
    assert event.previous == "1.0.0"
    assert ReleaseStore(root).current_version() == "1.0.0"
    assert fake_node.versions_run[-1] == "1.0.0"


def test_rollback_with_a_single_release_is_refused(*, make_updater: UpdaterFactory,
                                                   root: Path, installed_v1: str) -> None:
    """With nothing to go back to, rollback changes nothing and says so."""
    with pytest.raises(UpdateError, match="nothing to roll back to"):
        make_updater().rollback()
    assert ReleaseStore(root).current_version() == installed_v1


def test_concurrent_update_is_refused(*, make_updater: UpdaterFactory, make_bundle: BundleFactory,
                                      root: Path, installed_v1: str) -> None:
    """Two updaters never run at once (timer and operator): the second one is refused."""
    import fcntl
    with (root / ".update.lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        with pytest.raises(RuntimeError, match="another update is running"):
            make_updater().apply(make_bundle("1.1.0"))


# --- downgrades (rollback attacks) ---------------------------------------------------------


@pytest.fixture
def pruned_v1(make_updater: UpdaterFactory, make_bundle: BundleFactory, root: Path) -> Path:
    """1.0.0, 1.1.0 and 1.2.0 applied with keep=2: 1.0.0 is pruned; its bundle is returned."""
    old = make_bundle("1.0.0")
    for bundle in (old, make_bundle("1.1.0"), make_bundle("1.2.0")):
        make_updater(keep=2).apply(bundle)
    assert sorted(p.name for p in ReleaseStore(root).releases.iterdir()) == ["1.1.0", "1.2.0"]
    return old


def test_old_bundle_replayed_after_its_release_was_pruned_is_refused(
        *, make_updater: UpdaterFactory, pruned_v1: Path, root: Path,
        services: FakeServices) -> None:
    """An old, validly signed bundle whose release has been pruned cannot roll the device
    back: it is refused with both versions and the override named, nothing changes and
    no unit is touched. It used to be installed and committed again."""
    before = list(ReleaseStore(root).iter_tree())
    calls = list(services.calls)
    with pytest.raises(UpdateError, match=r"1\.0\.0 is older than 1\.2\.0") as err:
        make_updater(keep=2).apply(pruned_v1)
    assert err.value.event.outcome == "refused"
    assert "--allow-downgrade" in err.value.event.reason
    assert list(ReleaseStore(root).iter_tree()) == before
    assert services.calls == calls
    assert ReleaseStore(root).current_version() == "1.2.0"


def test_allow_downgrade_installs_an_older_bundle_but_keeps_the_floor(
        *, make_updater: UpdaterFactory, make_bundle: BundleFactory, pruned_v1: Path,
        root: Path) -> None:
    """With the operator's override the old release is installed and gated as usual; the
    newest version seen stays 1.2.0, so another old bundle is still refused."""
    event = make_updater(keep=2).apply(pruned_v1, allow_downgrade=True)
    assert event.outcome == "committed"
    store = ReleaseStore(root)
    assert store.current_version() == "1.0.0"
    assert store.highest_version() == "1.2.0"
    with pytest.raises(UpdateError, match=r"0\.9\.0 is older than 1\.2\.0"):
        make_updater(keep=2).apply(make_bundle("0.9.0"))
    assert make_updater(keep=2).apply(make_bundle("1.3.0")).outcome == "committed"


def test_a_release_the_gate_rolled_back_still_counts_as_installed(
        *, make_updater: UpdaterFactory, make_bundle: BundleFactory, root: Path,
        installed_v1: str) -> None:
    """The gate's own rollback to `previous` works as before (it is not a bundle); the
    failed release was installed, so a bundle older than it is a downgrade."""
    with pytest.raises(UpdateError, match="not READY within"):
        make_updater().apply(make_bundle("1.2.0", behaviour="never-ready"))
    assert ReleaseStore(root).current_version() == installed_v1
    with pytest.raises(UpdateError, match=r"1\.1\.0 is older than 1\.2\.0"):
        make_updater().apply(make_bundle("1.1.0"))


def test_a_device_without_the_record_starts_from_its_newest_release(
        *, make_updater: UpdaterFactory, make_bundle: BundleFactory, root: Path,
        installed_v1: str) -> None:
    """A device updated by an updater from before highest-version.json is protected at
    once: the newest release it holds is the floor."""
    make_updater().apply(make_bundle("1.1.0"))
    (root / "highest-version.json").unlink()
    with pytest.raises(UpdateError, match=r"1\.0\.5 is older than 1\.1\.0"):
        make_updater().apply(make_bundle("1.0.5"))
    make_updater().apply(make_bundle("1.2.0"))
    assert json.loads((root / "highest-version.json").read_text())["version"] == "1.2.0"


def test_a_damaged_record_refuses_updates_until_overridden(
        *, make_updater: UpdaterFactory, make_bundle: BundleFactory, root: Path,
        installed_v1: str) -> None:
    """A damaged highest-version.json is not guessed around: updates are refused, naming
    the file and the override; an overridden update writes it again."""
    (root / "highest-version.json").write_text("{not json")
    with pytest.raises(UpdateError, match=r"highest-version\.json is damaged.*--allow-downgrade"):
        make_updater().apply(make_bundle("1.1.0"))
    make_updater().apply(make_bundle("1.1.0"), allow_downgrade=True)
    assert ReleaseStore(root).highest_version() == "1.1.0"


def test_a_version_that_cannot_be_ordered_is_refused(
        *, make_updater: UpdaterFactory, signing_key: Ed25519PrivateKey, root: Path,
        installed_v1: str, tmp_path: Path) -> None:
    """A signed bundle whose version has no place in the order (here 'nightly') is refused
    even with the override, since downgrades could not be told apart."""
    bundle = _signed_bundle(tmp_path / "nightly", "engines/manifest.yaml", b"models: {}\n",
                            "nightly", "full", signing_key)
    with pytest.raises(UpdateError, match="'nightly' cannot be ordered"):
        make_updater().apply(bundle, allow_downgrade=True)
    assert ReleaseStore(root).current_version() == installed_v1


@pytest.mark.parametrize(("older", "newer"), [
    ("1.9.0", "1.10.0"),
    ("1.4.0rc1", "1.4.0"),
    ("1.4.0", "1.4.0+m1"),
    ("1.4.0+m9", "1.4.0+m10"),
    ("1.4.0+m10", "1.4.1"),
    ("2024.5.1", "2024.12.0"),
])
def test_release_versions_are_ordered_as_numbers(older: str, newer: str) -> None:
    """Downgrades are judged on release order, not text: 1.10.0 follows 1.9.0, a release
    candidate precedes its release, and models releases (+m1, +m2 ... +m10) follow their
    base and each other by number."""
    assert release_order(older) < release_order(newer)
