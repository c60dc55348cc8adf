"""Apply an update, gate it on health, roll back by itself when the new release fails.

    verify + unpack into .staging  ->  releases/<v>/ (+ venv)  ->  pending state
    -> switch `current`  ->  restart units  ->  wait for READY + N s healthy
    -> commit (prune to K)   or   switch back, restart, report why

Every outcome is written to `<root>/update-status.json` (the node publishes it on its
status topic), logged to the journal, and passed to `on_event`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge.durable import fsync_dir, write_atomic
from edge.update.bundle import (
    BundleError,
    BundleManifest,
    extract_verified,
    link_or_copy,
    release_order,
)
from edge.update.health import GatePolicy, HealthProbe, wait_healthy
from edge.update.shadow_gate import ShadowGate
from edge.update.store import (
    INSTALL_FILE,
    RELEASE_FILE,
    SIGNATURE_FILE,
    Outcome,
    ReleaseStore,
    UpdateEvent,
)

log = structlog.get_logger(__name__)

NODE_UNIT = "conveyor-vision.service"
ENGINES_UNIT = "conveyor-vision-engines.service"
VENV_BUILD_TIMEOUT_S = 1800.0  # both steps together: venv, then pip installing every wheel
SYSTEMCTL_TIMEOUT_S = 60.0  # one `systemctl --no-block` call
DOWNGRADE_OVERRIDE = "edge-node update apply --allow-downgrade BUNDLE"


class UpdateBusyError(RuntimeError):
    """Another update holds the lock: nothing was looked at."""


class UpdateError(RuntimeError):
    """An update that could not be applied; `event` says what was reported."""

    def __init__(self, event: UpdateEvent) -> None:
        super().__init__(event.reason)
        self.event = event


class ServiceManager(Protocol):
    def restart(self, unit: str) -> None: ...
    def start(self, unit: str) -> None: ...


class SystemctlManager:
    """Runs `systemctl --no-block`: the health gate, not systemctl, decides success."""

    def __init__(self, systemctl: str = "systemctl") -> None:
        self.systemctl = systemctl

    def _run(self, verb: str, unit: str) -> None:
        # Never raises: a unit that did not (re)start shows up in the health gate, which
        # then rolls back; an exception here would leave the switch half done.
        try:
            result = subprocess.run([self.systemctl, "--no-block", verb, unit],
                                    capture_output=True, text=True,
                                    timeout=SYSTEMCTL_TIMEOUT_S, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            log.error("systemctl_failed", verb=verb, unit=unit, error=str(exc))
            return
        if result.returncode != 0:
            log.error("systemctl_failed", verb=verb, unit=unit, stderr=result.stderr.strip())

    def restart(self, unit: str) -> None:
        self._run("restart", unit)

    def start(self, unit: str) -> None:
        self._run("start", unit)


class NoServices:
    """For staging releases on an image or in tests: touches no unit."""

    def restart(self, unit: str) -> None:
        log.info("service_restart_skipped", unit=unit)

    def start(self, unit: str) -> None:
        log.info("service_start_skipped", unit=unit)


EnvBuilder = Callable[[Path], None]


def build_venv(release_dir: Path) -> None:
    """Create `venv/` (seeing the system site-packages: JetPack's TensorRT and OpenCV) and
    install every wheel from `wheels/`, offline, within VENV_BUILD_TIMEOUT_S in all."""
    wheels = sorted((release_dir / "wheels").glob("*.whl"))
    if not wheels:
        return
    venv = release_dir / "venv"
    python = os.environ.get("CONVEYOR_VISION_PYTHON", "/usr/bin/python3")
    commands = [
        [python, "-m", "venv", "--system-site-packages", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-index", "--no-cache-dir",
         "--find-links", str(release_dir / "wheels"), *map(str, wheels)],
    ]
    deadline = time.monotonic() + VENV_BUILD_TIMEOUT_S
    for cmd in commands:
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, check=False,
                                    timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:  # run() has killed the step
            raise BundleError(f"building the venv took longer than {VENV_BUILD_TIMEOUT_S:g} s "
                              f"(stopped: {' '.join(cmd[:4])} …)") from None
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise BundleError(f"building the venv failed: {' | '.join(tail)}")


def longest_apply_s(gate: GatePolicy) -> float:
    """The longest `Updater.apply` runs with `build_venv` and `SystemctlManager`; the
    update unit's TimeoutStartSec= must stay above it (tests/systemd/test_unit_files.py
    checks), or systemd kills an update between switching and committing or rolling back.

    The worst path: an update a reboot interrupted is gated again and rolled back, then
    a full bundle builds its venv, is switched to, gated and rolled back. Each switch is
    at most two systemctl calls (engines unit, node unit). Unpacking and hashing the
    bundle depend on the disk and have no bound here: the unit's margin covers them.
    """
    switch_s = 2 * SYSTEMCTL_TIMEOUT_S
    interrupted_s = gate.longest_wait_s() + switch_s
    new_s = VENV_BUILD_TIMEOUT_S + switch_s + gate.longest_wait_s() + switch_s
    return interrupted_s + new_s


@dataclass(frozen=True, slots=True)
class UpdatePolicy:
    keep: int = 3
    gate: GatePolicy = field(default_factory=GatePolicy)
    shadow: ShadowGate | None = None  # new models must have run in shadow here (None: off)


class Updater:
    def __init__(self, root: Path, *, public_keys: Sequence[Ed25519PublicKey],
                 services: ServiceManager, probe_for: Callable[[str], HealthProbe],
                 policy: UpdatePolicy | None = None, env_builder: EnvBuilder = build_venv,
                 on_event: Callable[[UpdateEvent], None] | None = None,
                 stop: threading.Event | None = None) -> None:
        self.store = ReleaseStore(root)
        self.keys = tuple(public_keys)
        self.services = services
        self.probe_for = probe_for
        self.policy = policy or UpdatePolicy()
        if self.policy.keep < 2:
            raise ValueError(f"keep must be >= 2 (current and previous), got {self.policy.keep}")
        self.env_builder = env_builder
        self.on_event = on_event
        self.stop = stop or threading.Event()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.store.ensure_layout()
        with (self.store.root / ".update.lock").open("a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UpdateBusyError("another update is running (lock held)") from None
            yield

    def _emit(self, outcome: Outcome, version: str | None, previous: str | None,
              reason: str) -> UpdateEvent:
        event = UpdateEvent(outcome=outcome, version=version, previous=previous, reason=reason,
                            at_ms=time.time() * 1000.0)
        self.store.record_event(event)
        level = log.info if outcome in ("committed", "installed") else log.error
        level("update_" + outcome, version=version, previous=previous, reason=reason)
        if self.on_event is not None:
            self.on_event(event)
        return event

    # --- apply ---------------------------------------------------------------------------

    def apply(self, bundle: Path, *, restart: bool = True,
              allow_downgrade: bool = False) -> UpdateEvent:
        """Install `bundle`, switch to it and gate on health; raises UpdateError if refused
        or rolled back. With `restart=False` the release is switched to and committed
        without touching units (provisioning an image). A bundle older than the newest
        release ever installed here is refused unless `allow_downgrade`."""
        with self._locked():
            self._recover()
            previous = self.store.current_version()
            manifest = self._install(bundle, previous, allow_downgrade)
            version = manifest.version
            self.store.set_pending(version, previous)
            self.store.mark(version, "pending")
            self.store.switch_current(version)
            if previous is not None:
                self.store.set_previous(previous)
            if not restart:
                return self._commit(version, previous, "switched without restart")
            if manifest.kind == "models":
                self.services.start(ENGINES_UNIT)  # rebuild/verify engines for the new models
            self.services.restart(NODE_UNIT)
            return self._gate(version, previous)

    def _install(self, bundle: Path, current: str | None, allow_downgrade: bool) -> BundleManifest:
        staging = self.store.staging / f"{bundle.name}.{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        target: Path | None = None
        try:
            verified = extract_verified(bundle, self.keys, staging)
            manifest = verified.manifest
            target = self._check_target(manifest, current)
            self._check_not_older(manifest.version, allow_downgrade)
            if self.policy.shadow is not None:  # refuses models that have not run in shadow
                self.policy.shadow.check(
                    staging, None if current is None else self.store.release_dir(current))
            if manifest.kind == "models":
                assert current is not None  # _check_target refused otherwise
                self._assemble_models_release(staging, current)
            os.rename(staging, target)  # a whole folder (edge.durable replaces files)
            fsync_dir(target.parent)
            if manifest.kind == "full":
                self.env_builder(target)  # a venv must be built where it will live
            write_atomic(target / SIGNATURE_FILE, verified.signature)
            base = self._venv_owner(current) if manifest.kind == "models" else None
            self.store.mark(manifest.version, "installed", installed_ms=time.time() * 1000.0,
                            base_version=base)
            # Before release.json: a release is never complete without having raised it.
            self.store.record_installed(manifest.version)
            # The unpacked files, hard links and the venv pip built were written without
            # fsync: flush them all before release.json says the release is complete, or a
            # power cut could leave a "complete" release with empty files. One sync(2) (Linux
            # waits for it) instead of an fsync per file: a venv holds thousands.
            os.sync()
            write_atomic(target / RELEASE_FILE, verified.manifest_raw)  # complete from here
        except (BundleError, OSError) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if target is not None and not (target / RELEASE_FILE).exists():
                shutil.rmtree(target, ignore_errors=True)
            reason = str(exc) if isinstance(exc, BundleError) else f"install failed: {exc}"
            raise UpdateError(self._emit("refused", None, current, reason)) from exc
        log.info("release_installed", version=manifest.version, kind=manifest.kind,
                 files=len(manifest.files))
        return manifest

    def _check_target(self, manifest: BundleManifest, current: str | None) -> Path:
        target = self.store.release_dir(manifest.version)
        if target.exists():
            raise BundleError(f"release {manifest.version} is already installed")
        if manifest.kind == "models":
            if current is None:
                raise BundleError("a models bundle needs an installed release to update")
            if manifest.base_version and manifest.base_version != current:
                raise BundleError(f"models bundle is for release {manifest.base_version}, "
                                  f"current is {current}")
        return target

    def _check_not_older(self, version: str, allow_downgrade: bool) -> None:
        """Refuse a rollback attack: an old, validly signed bundle replayed once its
        release was pruned. Same version again is left to _check_target."""
        order = release_order(version)  # unorderable: refused, even with the override
        try:
            highest = self.store.highest_version()
        except BundleError as exc:
            if allow_downgrade:
                return
            raise BundleError(f"{exc}; to install anyway: {DOWNGRADE_OVERRIDE}") from None
        if highest is None or order >= release_order(highest):
            return
        if allow_downgrade:
            log.warning("update_downgrade_allowed", version=version, highest=highest)
            return
        raise BundleError(f"release {version} is older than {highest}, the newest release "
                          f"installed on this device: downgrade refused (an old bundle can "
                          f"bring back fixed bugs); to install it anyway: {DOWNGRADE_OVERRIDE}")

    def _venv_owner(self, version: str | None) -> str | None:
        """The release whose venv `version` runs (itself, or its base for models releases)."""
        if version is None:
            return None
        venv = self.store.release_dir(version) / "venv"
        if venv.is_symlink():
            return Path(os.readlink(venv)).parent.name
        return version

    def _assemble_models_release(self, staging: Path, current: str) -> None:
        """A models release = the current release's files (hard links), its venv shared by
        a symlink, with the bundle's engines/ files laid over."""
        src = self.store.release_dir(current)
        new_files = {p.relative_to(staging) for p in staging.rglob("*") if p.is_file()}
        for entry in src.iterdir():
            if entry.name in ("venv", "wheels", RELEASE_FILE, SIGNATURE_FILE, INSTALL_FILE):
                continue
            dest = staging / entry.name
            if entry.is_dir() and not entry.is_symlink():
                shutil.copytree(entry, dest, symlinks=True, dirs_exist_ok=True,
                                copy_function=link_or_copy,
                                ignore=_skip_replaced(src, new_files))
            elif not dest.exists():
                link_or_copy(str(entry), str(dest))
        owner = self._venv_owner(current)
        if owner is not None and (self.store.release_dir(owner) / "venv").exists():
            os.symlink(f"../{owner}/venv", staging / "venv")

    # --- gate, commit, rollback ----------------------------------------------------------

    def _gate(self, version: str, previous: str | None) -> UpdateEvent:
        result = wait_healthy(self.probe_for(version), self.policy.gate, self.stop)
        if result.ok:
            return self._commit(version, previous, result.reason)
        if previous is None:
            self.store.mark(version, "rolled_back", result.reason)
            self.store.clear_pending()
            raise UpdateError(self._emit("rolled_back", version, None,
                                         f"{result.reason}; no earlier release to go back to"))
        self._switch_back(version, previous, result.reason)
        raise UpdateError(self._emit("rolled_back", version, previous, result.reason))

    def _commit(self, version: str, previous: str | None, reason: str) -> UpdateEvent:
        self.store.mark(version, "committed", reason)
        self.store.clear_pending()
        removed = self.store.prune(self.policy.keep)
        if removed:
            log.info("releases_pruned", removed=removed, keep=self.policy.keep)
        return self._emit("committed", version, previous, reason)

    def _switch_back(self, failed: str, previous: str, reason: str) -> None:
        # The switch first: a record that cannot be written (disk full) must not keep the
        # device on the failed release.
        self.store.switch_current(previous)
        try:
            self.store.mark(failed, "rolled_back", reason)
            older = [i.version for i in self.store.installed()
                     if i.version not in (failed, previous) and i.status == "committed"]
            self.store.set_previous(older[-1] if older else None)
            self.store.clear_pending()
        except OSError as exc:
            log.error("rollback_record_failed", failed=failed, current=previous, error=str(exc))
        if (self.store.release_dir(failed) / RELEASE_FILE).exists() and self._is_models(failed):
            self.services.start(ENGINES_UNIT)
        self.services.restart(NODE_UNIT)

    def _is_models(self, version: str) -> bool:
        info = self.store.info(version)
        return info is not None and info.kind == "models"

    def _recover(self) -> None:
        """An update interrupted mid-gate (reboot, kill): gate it again, or roll it back."""
        pending = self.store.pending()
        if pending is None:
            self.store.clean_staging()
            return
        version, previous = str(pending["pending"]), pending.get("previous")
        log.warning("update_interrupted_resuming", version=version, previous=previous)
        if self.store.current_version() != version:
            self.store.clear_pending()
            self.store.clean_staging()
            return
        with contextlib.suppress(UpdateError):
            self._gate(version, str(previous) if previous else None)
        self.store.clean_staging()

    def resume(self) -> UpdateEvent | None:
        """Finish an interrupted update, if any (the timer runs this after a reboot)."""
        with self._locked():
            had = self.store.pending() is not None
            self._recover()
            return self.store.last_event() if had else None

    def rollback(self, reason: str = "operator rollback", *, restart: bool = True) -> UpdateEvent:
        """Go back to `previous` (or the newest other committed release)."""
        with self._locked():
            current = self.store.current_version()
            target = self.store.previous_version()
            if target is None or target == current:
                others = [i.version for i in self.store.installed()
                          if i.version != current and i.status == "committed"]
                target = others[-1] if others else None
            if current is None or target is None:
                raise UpdateError(self._emit("refused", current, None,
                                             "nothing to roll back to"))
            if restart:
                self._switch_back(current, target, reason)
            else:
                self.store.mark(current, "rolled_back", reason)
                self.store.switch_current(target)
                self.store.set_previous(None)
            return self._emit("rolled_back", current, target, reason)


def _skip_replaced(src_root: Path, new_files: set[Path]) -> Callable[[str, list[str]], set[str]]:
    def ignore(directory: str, names: list[str]) -> set[str]:
        rel = Path(directory).relative_to(src_root)
        return {n for n in names if rel / n in new_files}
    return ignore

