"""The shadow gate: an update that changes the models needs their shadow record on this device.

Real bundles, a real release store and the shadow record as the node's shadow scorer writes
it (`edge.audit.shadow_record`); the models are stand-in bytes (the gate compares manifests
by sha256 and never loads them).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.audit.shadow_record import SHADOW_RECORD_FILE, ShadowRecord, write_shadow_record
from edge.commands.update import main
from edge.config import ConfigError, ShadowGateConfig, parse_config_text
from edge.update.health import HealthFileProbe, HealthProbe
from edge.update.shadow_gate import ShadowGate
from edge.update.store import ReleaseStore
from edge.update.updater import UpdateError, UpdatePolicy, Updater

from .conftest import FAST_GATE, BundleFactory, FakeNode, FakeServices, fake_venv

OLD_MODELS = b"schema: 1\nversion: 1.0.0\n"
NEW_MODELS = b"schema: 1\nversion: 1.0.0.site1\n"
NEW_SHA = hashlib.sha256(NEW_MODELS).hexdigest()
GATE = ShadowGateConfig(enabled=True, min_items=500, min_agreement=0.95,
                        max_sideline_rate_increase=0.01)


def record(**changes: object) -> ShadowRecord:
    """A record of the new models that passes GATE, with `changes`."""
    base: dict[str, object] = {
        "candidate_version": "1.0.0.site1", "candidate_sha256": NEW_SHA, "items_scored": 800,
        "items_skipped": 3, "agreements": 784, "sidelined_candidate": 12,
        "sidelined_production": 8, "updated_ms": 1.7e12}
    base.update(changes)
    return ShadowRecord(**base)  # type: ignore[arg-type]


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def gated(root: Path, signing_key: Ed25519PrivateKey, services: FakeServices,
          fake_node: FakeNode, make_bundle: BundleFactory, state: Path) -> Updater:
    """An updater with the shadow gate on, over a device running release 1.0.0."""
    def probe_for(version: str) -> HealthProbe:
        return HealthFileProbe(fake_node.health_path, version, max_age_s=0.5)

    updater = Updater(root, public_keys=[signing_key.public_key()], services=services,
                      probe_for=probe_for,
                      policy=UpdatePolicy(gate=FAST_GATE,
                                          shadow=ShadowGate.from_config(GATE, state)),
                      env_builder=fake_venv)
    updater.apply(make_bundle("1.0.0", files={"engines/manifest.yaml": OLD_MODELS,
                                              "config/default.yaml": b"node: {}\n"}),
                  restart=False)
    return updater


def _models_bundle(make_bundle: BundleFactory, version: str = "1.0.0+m1",
                   manifest: bytes = NEW_MODELS, base: str = "1.0.0") -> Path:
    return make_bundle(version, "models", base_version=base,
                       files={"engines/manifest.yaml": manifest,
                              "engines/damage/damage.onnx": b"weights" * 100})


@pytest.mark.parametrize(("rec", "says"), [
    (None, "no shadow record at"),
    (record(candidate_sha256="ab" * 32, candidate_version="0.9-other"),
     "the shadow record is for candidate 0.9-other"),
    (record(items_scored=400, agreements=399), "scored 400 items in shadow, fewer than the 500"),
    (record(agreements=700), "agreed with production on 87.50% of 800 items"),
    (record(sidelined_candidate=20), "sidelined 2.50% of the items in shadow against "
                                     "production's 1.00%"),
    (record(items_failed=9), "failed on 9 of the 809 items it tried in shadow (1.11%)"),
    (record(sidelined_candidate=0, sidelined_production=40, agreements=760),
     "sidelined 0.00% of the items in shadow against production's 5.00%: more than "
     "update.shadow_gate.max_sideline_rate_decrease 1.00% below it"),
])
def test_models_without_a_good_shadow_record_are_refused(
        gated: Updater, make_bundle: BundleFactory, state: Path, root: Path,
        rec: ShadowRecord | None, says: str) -> None:
    """No record, another candidate's, too few items, too little agreement, too high a
    sideline rate, too many failures (over 1 % of the items tried), or a sideline rate far
    below production's (a candidate that passes what production sidelines agrees on the
    rest of a line that is nearly all good): the models bundle is refused with the reason
    (the updater's refusal event, as the journal and the status topic get it), nothing is
    installed and the device stays on its release."""
    if rec is not None:
        write_shadow_record(state / SHADOW_RECORD_FILE, rec)
    with pytest.raises(UpdateError) as refused:
        gated.apply(_models_bundle(make_bundle), restart=False)
    event = refused.value.event
    assert event.outcome == "refused"
    assert event.reason.startswith("shadow gate: ")
    assert says in event.reason
    store = ReleaseStore(root)
    assert store.current_version() == "1.0.0"
    assert [i.version for i in store.installed()] == ["1.0.0"]
    assert store.last_event() == event


def test_models_with_their_shadow_record_within_bounds_are_installed(
        gated: Updater, make_bundle: BundleFactory, state: Path, root: Path) -> None:
    """The record of exactly the bundle's manifest, with enough items, agreement and a
    sideline rate within bounds: the update goes ahead and commits."""
    write_shadow_record(state / SHADOW_RECORD_FILE, record())
    event = gated.apply(_models_bundle(make_bundle), restart=False)
    assert event.outcome == "committed"
    assert (root / "current" / "engines" / "manifest.yaml").read_bytes() == NEW_MODELS


def test_a_release_that_keeps_the_models_is_not_gated(
        gated: Updater, make_bundle: BundleFactory, root: Path) -> None:
    """A full release whose engines/manifest.yaml is the running one (software only) needs
    no shadow record."""
    event = gated.apply(make_bundle("1.1.0", files={"engines/manifest.yaml": OLD_MODELS,
                                                    "config/default.yaml": b"node: {}\n"}),
                        restart=False)
    assert event.outcome == "committed"
    assert ReleaseStore(root).current_version() == "1.1.0"


def test_update_apply_reads_the_gate_from_the_node_config(
        make_bundle: BundleFactory, public_key_file: Path, root: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`edge-node update apply --config FILE` takes `update.shadow_gate` and the record under
    `storage.state_dir`: exit 1 and the reason while the record is missing, 0 once it is
    there; without the gate in the config the same bundle goes in unchecked."""
    state = tmp_path / "node-state"
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"storage": {"state_dir": str(state)}, "update": {
        "shadow_gate": {"enabled": True, "min_items": 500, "min_agreement": 0.95}}}))
    common = ["--root", str(root), "--public-key", str(public_key_file), "--no-restart"]
    base = make_bundle("1.0.0", files={"engines/manifest.yaml": OLD_MODELS,
                                       "config/default.yaml": b"node: {}\n"})
    assert main(["update", "apply", *common, str(base)]) == 0
    bundle = _models_bundle(make_bundle)
    assert main(["update", "apply", *common, "--config", str(config), str(bundle)]) == 1
    err = capsys.readouterr().err
    assert "update refused: shadow gate: no shadow record at" in err
    assert str(state / SHADOW_RECORD_FILE) in err
    write_shadow_record(state / SHADOW_RECORD_FILE, record())
    assert main(["update", "apply", *common, "--config", str(config), str(bundle)]) == 0
    assert ReleaseStore(root).current_version() == "1.0.0+m1"
    off = tmp_path / "off.yaml"
    off.write_text(json.dumps({"storage": {"state_dir": str(tmp_path / "elsewhere")}}))
    other = _models_bundle(make_bundle, "1.0.0+m2", b"schema: 1\nversion: other\n",
                           base="1.0.0+m1")
    assert main(["update", "apply", *common, "--config", str(off), str(other)]) == 0
    assert ReleaseStore(root).current_version() == "1.0.0+m2"


def test_a_node_config_that_is_named_but_missing_refuses_the_bundle(
        make_bundle: BundleFactory, public_key_file: Path, root: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`--config` naming no file (a typo, a device without its config): the gate it may hold
    cannot be read, so the models bundle is refused, not installed unchecked, and stays in
    the inbox for the run after the config is back."""
    common = ["--root", str(root), "--public-key", str(public_key_file), "--no-restart"]
    base = make_bundle("1.0.0", files={"engines/manifest.yaml": OLD_MODELS,
                                       "config/default.yaml": b"node: {}\n"})
    assert main(["update", "apply", *common, str(base)]) == 0
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    bundle = _models_bundle(make_bundle).replace(inbox / "cv-1.0.0+m1.cvb")
    os.utime(bundle, (time.time() - 100, time.time() - 100))
    missing = tmp_path / "etc" / "config.yaml"
    assert main(["update", "apply", *common, "--config", str(missing), str(inbox)]) == 1
    err = capsys.readouterr().err
    # The path as ConfigError shows it: cut to 80 characters when the temporary folder is
    # deep (pytest-xdist's popen-gwN level makes it so).
    said = str(ConfigError("--config", str(missing), "")).removesuffix(", expected ")
    assert said.startswith(f"config key '--config': got '{str(missing)[:60]}")
    assert f"update: {said}, expected the node's config file" in err
    assert "the bundle is not installed without it" in err
    assert bundle.exists()
    assert ReleaseStore(root).current_version() == "1.0.0"


def test_shadow_gate_config_is_off_by_default_and_checked() -> None:
    """`update.shadow_gate` is off unless enabled; a bound out of range names its key."""
    assert parse_config_text("{}").update.shadow_gate.enabled is False
    cfg = parse_config_text("update: {shadow_gate: {enabled: true, min_items: 50}}")
    assert (cfg.update.shadow_gate.min_items, cfg.update.shadow_gate.min_agreement) == (50, 0.98)
    assert cfg.update.shadow_gate.max_sideline_rate_decrease == 0.01
    with pytest.raises(ConfigError, match=r"update\.shadow_gate\.min_agreement"):
        parse_config_text("update: {shadow_gate: {min_agreement: 1.5}}")
    with pytest.raises(ConfigError, match=r"update\.shadow_gate\.max_sideline_rate_decrease"):
        parse_config_text("update: {shadow_gate: {max_sideline_rate_decrease: -0.1}}")
    with pytest.raises(ConfigError, match=r"update\.shadow_gate\.max_items"):
        parse_config_text("update: {shadow_gate: {max_items: 5}}")
