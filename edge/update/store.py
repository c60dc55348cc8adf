"""The release store on a device: `<root>/releases/<version>/`, `current` and `previous`.

    <root>/releases/<version>/      one installed release (complete once release.json exists)
    <root>/releases/<version>/.install.json   when it was installed and what became of it
    <root>/current -> releases/<version>      what the units run (switched atomically)
    <root>/previous -> releases/<version>     what a rollback goes back to
    <root>/update-state.json        an update in progress (survives a reboot mid-update)
    <root>/update-status.json       the last update event, for the node's status topic
    <root>/highest-version.json     the newest release ever installed: older bundles are
                                    refused (a replayed old bundle is a rollback attack)
    <root>/.staging/                bundles are unpacked and checked here first

Symlinks are switched by creating a temporary symlink and `rename()`-ing it over the
old one, so a reader sees either the old or the new release, never neither.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import structlog

from edge.durable import fsync_dir, write_atomic
from edge.update.bundle import BundleError, release_order

log = structlog.get_logger(__name__)

DEFAULT_ROOT = Path("/opt/conveyor-vision")
RELEASE_FILE = "release.json"
SIGNATURE_FILE = "manifest.sig"
INSTALL_FILE = ".install.json"
Status = Literal["installed", "pending", "committed", "rolled_back"]
Outcome = Literal["committed", "rolled_back", "refused", "installed"]


@dataclass(frozen=True, slots=True)
class ReleaseInfo:
    version: str
    path: Path
    kind: str
    installed_ms: float
    status: str
    reason: str
    base_version: str | None  # the release whose venv a models release shares


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace `path` with `data` as JSON, durably (see edge.durable)."""
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True))


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def running_release_version(default: str, env: dict[str, str] | None = None) -> str:
    """The version `current` names under `$CONVEYOR_VISION_ROOT` (the unit sets it), else default.

    The node calls this once at start and puts the answer in its health file, which is
    how the updater knows the node it sees is the release it just switched to.
    """
    environ = os.environ if env is None else env
    root = environ.get("CONVEYOR_VISION_ROOT")
    if not root:
        return default
    return ReleaseStore(Path(root)).current_version() or default


class ReleaseStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.releases = root / "releases"
        self.staging = root / ".staging"
        self.state_file = root / "update-state.json"
        self.status_file = root / "update-status.json"
        self.highest_file = root / "highest-version.json"

    def ensure_layout(self) -> None:
        for d in (self.root, self.releases, self.staging):
            d.mkdir(parents=True, exist_ok=True)

    def release_dir(self, version: str) -> Path:
        return self.releases / version

    # --- links ---------------------------------------------------------------------------

    def _link_version(self, name: str) -> str | None:
        link = self.root / name
        try:
            target = os.readlink(link)
        except OSError:
            return None
        version = Path(target).name
        return version if (self.release_dir(version) / RELEASE_FILE).exists() else None

    def current_version(self) -> str | None:
        return self._link_version("current")

    def previous_version(self) -> str | None:
        return self._link_version("previous")

    def _switch(self, name: str, version: str | None) -> None:
        link = self.root / name
        if version is None:
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
                fsync_dir(self.root)
            return
        if not (self.release_dir(version) / RELEASE_FILE).exists():
            raise FileNotFoundError(f"release {version} is not installed")
        tmp = self.root / f".{name}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(f"releases/{version}", tmp)
        # A symlink, not a file: edge.durable writes files. Atomic: readers see the old or
        # the new target; the folder fsync makes the switch survive a power cut.
        os.replace(tmp, link)
        fsync_dir(self.root)

    def switch_current(self, version: str) -> None:
        self._switch("current", version)
        log.info("release_switched", current=version)

    def set_previous(self, version: str | None) -> None:
        self._switch("previous", version)

    # --- releases ------------------------------------------------------------------------

    def info(self, version: str) -> ReleaseInfo | None:
        d = self.release_dir(version)
        manifest = read_json(d / RELEASE_FILE)
        if not isinstance(manifest, dict):
            return None
        record = read_json(d / INSTALL_FILE)
        record = record if isinstance(record, dict) else {}
        base = record.get("base_version")
        return ReleaseInfo(version=version, path=d, kind=str(manifest.get("kind", "full")),
                           installed_ms=float(record.get("installed_ms", 0.0)),
                           status=str(record.get("status", "installed")),
                           reason=str(record.get("reason", "")),
                           base_version=str(base) if base else None)

    def installed(self) -> list[ReleaseInfo]:
        """Complete releases, oldest install first."""
        if not self.releases.is_dir():
            return []
        found = (self.info(p.name) for p in self.releases.iterdir() if p.is_dir())
        return sorted((i for i in found if i is not None),
                      key=lambda i: (i.installed_ms, i.version))

    def mark(self, version: str, status: Status, reason: str = "", **extra: Any) -> None:
        path = self.release_dir(version) / INSTALL_FILE
        record = read_json(path)
        record = record if isinstance(record, dict) else {}
        record.update(extra, status=status, reason=reason, updated_ms=time.time() * 1000.0)
        write_json_atomic(path, record)

    def remove(self, version: str) -> None:
        if version in (self.current_version(), self.previous_version()):
            raise RuntimeError(f"refusing to remove release {version}: it is current or previous")
        shutil.rmtree(self.release_dir(version))
        log.info("release_removed", version=version)

    def prune(self, keep: int) -> list[str]:
        """Keep `current`, `previous`, the releases they share a venv with and the newest
        others up to `keep` in all; remove the rest. Returns what was removed."""
        infos = self.installed()
        by_version = {i.version: i for i in infos}
        pinned = {v for v in (self.current_version(), self.previous_version()) if v}
        kept = set(pinned)
        for info in reversed(infos):  # newest first; rolled-back releases are never kept
            if len(kept) >= keep:
                break
            if info.status != "rolled_back":
                kept.add(info.version)
        for v in list(kept):  # a models release needs the release that owns its venv
            base = by_version[v].base_version if v in by_version else None
            while base and base in by_version and base not in kept:
                kept.add(base)
                base = by_version[base].base_version
        removed = [i.version for i in infos if i.version not in kept]
        for version in removed:
            self.remove(version)
        self.clean_staging()
        return removed

    def clean_staging(self) -> None:
        if self.staging.is_dir():
            for p in self.staging.iterdir():
                shutil.rmtree(p, ignore_errors=True)
        if self.releases.is_dir():  # half-installed releases (no release.json) from a crash
            for p in self.releases.iterdir():
                if p.is_dir() and not (p / RELEASE_FILE).exists():
                    shutil.rmtree(p, ignore_errors=True)

    # --- state ---------------------------------------------------------------------------

    def highest_version(self) -> str | None:
        """The newest release version ever installed here. Kept outside releases/, so
        pruning never lowers it; a device whose updater predates the file starts from the
        newest release it holds. A damaged file raises BundleError: guessing could let an
        old bundle back in."""
        try:
            text = self.highest_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return self._newest_installed()
        except OSError as exc:
            raise BundleError(f"cannot read {self.highest_file}: {exc}") from None
        try:
            version = json.loads(text)["version"]
            release_order(version)
        except (ValueError, KeyError, TypeError, BundleError):
            raise BundleError(f"{self.highest_file} is damaged (no orderable 'version' in "
                              "it)") from None
        return str(version)

    def record_installed(self, version: str) -> None:
        """Raise the highest installed version to `version` (it never goes down), durably."""
        damaged = False
        try:
            highest = self.highest_version()
        except BundleError:  # only an --allow-downgrade update gets here: rebuild the file
            highest, damaged = self._newest_installed(), True
        if highest is not None and release_order(version) <= release_order(highest):
            if not damaged:
                return
            version = highest
        write_json_atomic(self.highest_file, {"version": version,
                                              "updated_ms": time.time() * 1000.0})

    def _newest_installed(self) -> str | None:
        orderable = []
        for info in self.installed():
            try:
                orderable.append((release_order(info.version), info.version))
            except BundleError:
                log.warning("release_version_unorderable", version=info.version)
        return max(orderable)[1] if orderable else None

    def pending(self) -> dict[str, Any] | None:
        data = read_json(self.state_file)
        return data if isinstance(data, dict) and data.get("pending") else None

    def set_pending(self, version: str, previous: str | None) -> None:
        write_json_atomic(self.state_file, {"pending": version, "previous": previous,
                                            "started_ms": time.time() * 1000.0})

    def clear_pending(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()
            fsync_dir(self.root)  # a pending update that came back would be acted on again

    def record_event(self, event: UpdateEvent) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.status_file, asdict(event))

    def last_event(self) -> UpdateEvent | None:
        data = read_json(self.status_file)
        try:
            return UpdateEvent(**data) if isinstance(data, dict) else None
        except TypeError:
            return None

    def iter_tree(self) -> Iterator[tuple[str, str]]:
        """(relative path, link target or file digest-free marker) of everything but the
        event file: what tests compare to show an update changed nothing."""
        for path in sorted(self.root.rglob("*")):
            rel = path.relative_to(self.root).as_posix()
            if path == self.status_file:
                continue
            if path.is_symlink():
                yield rel, "-> " + os.readlink(path)
            elif path.is_file():
                yield rel, f"{path.stat().st_size}:{path.stat().st_mtime_ns}"
            else:
                yield rel, "dir"


@dataclass(frozen=True, slots=True)
class UpdateEvent:
    """One update outcome; the node publishes the last one on its status topic."""

    outcome: Outcome
    version: str | None
    previous: str | None
    reason: str
    at_ms: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
