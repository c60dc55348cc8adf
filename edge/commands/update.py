"""`edge-node update apply BUNDLE|rollback|status|resume`: what an operator or the timer runs.

`apply` takes a bundle file or an inbox folder (the newest `*.cvb` in it is applied; every
bundle it looked at moves to `<inbox>/processed/`, so the timer does not retry them). In an
inbox, a bundle written to in the last `--settle` seconds is left for the next run (a copy
may still be arriving), and so is every bundle while another update holds the lock; with
nothing to apply, an update that a reboot interrupted is finished (`resume`).
A bundle older than the newest release ever installed on the device is refused (an old
signed bundle must not roll a device back to known bugs) unless `--allow-downgrade`.
With `update.shadow_gate` on in the node's config (`--config`, default
/etc/conveyor-vision/config.yaml when it exists), a bundle that changes the models is refused
unless they ran in shadow on this device (edge/update/shadow_gate.py). The config is read
only when there is a bundle to install: finishing an interrupted update never depends on it.
A `--config` that names no file refuses the bundle (the gate it may hold cannot be read).
Exit status: 0 committed (or nothing to do), 1 refused or rolled back, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge.config import ConfigError, load_config
from edge.health_file import DEFAULT_HEALTH_FILE
from edge.update.bundle import BundleError, load_public_keys
from edge.update.health import AllOf, GatePolicy, HealthFileProbe, HealthProbe, SystemctlProbe
from edge.update.shadow_gate import ShadowGate
from edge.update.store import DEFAULT_ROOT, ReleaseStore
from edge.update.updater import (
    NODE_UNIT,
    NoServices,
    ServiceManager,
    SystemctlManager,
    UpdateBusyError,
    UpdateError,
    UpdatePolicy,
    Updater,
)

log = structlog.get_logger(__name__)

DEFAULT_PUBLIC_KEY = Path("/etc/conveyor-vision/update-signing.pub")
#: The node's config as the service unit names it: the update unit reads its update section.
DEFAULT_CONFIG = Path("/etc/conveyor-vision/config.yaml")
BUNDLE_SUFFIX = ".cvb"
_GATE = GatePolicy()  # the defaults; the update unit's TimeoutStartSec= is sized on them


def add_update_commands(
        subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `update apply|rollback|status|resume`; the handler is `args.func(args) -> int`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", type=Path, default=DEFAULT_ROOT,
                        help=f"release store (default {DEFAULT_ROOT})")
    gated = argparse.ArgumentParser(add_help=False)
    gated.add_argument("--no-restart", action="store_true",
                       help="switch without restarting units or waiting for health "
                       "(provisioning an image)")
    gated.add_argument("--systemctl", default="systemctl", help=argparse.SUPPRESS)

    update = subparsers.add_parser("update", help="install, roll back and inspect releases")
    sub = update.add_subparsers(dest="update_command", required=True)

    apply = sub.add_parser("apply", parents=[common, gated],
                           help="verify, install and switch to a release bundle, health-gated")
    apply.add_argument("bundle", type=Path, help="a .cvb bundle, or an inbox folder of them")
    apply.add_argument("--public-key", type=Path, default=DEFAULT_PUBLIC_KEY,
                       help=f"trusted ed25519 key(s), PEM (default {DEFAULT_PUBLIC_KEY})")
    apply.add_argument("--keep", type=int, default=3, help="releases to retain (>= 2)")
    apply.add_argument("--ready-timeout", type=float, default=_GATE.ready_timeout_s,
                       help="seconds the new release has to report READY")
    apply.add_argument("--healthy-for", type=float, default=_GATE.healthy_for_s,
                       help="seconds it must then stay healthy before the update commits")
    apply.add_argument("--poll", type=float, default=_GATE.poll_s, help=argparse.SUPPRESS)
    apply.add_argument("--settle", type=float, default=30.0,
                       help="inbox: seconds a bundle must be unchanged before it is taken")
    apply.add_argument("--health-file", type=Path, default=DEFAULT_HEALTH_FILE,
                       help=f"the node's health file (default {DEFAULT_HEALTH_FILE})")
    apply.add_argument("--allow-downgrade", action="store_true",
                       help="install a bundle older than the newest release this device "
                       "has installed (refused otherwise)")
    apply.add_argument("--config", type=Path, default=None,
                       help="the node's config, for update.shadow_gate and where the shadow "
                       f"record is (default: {DEFAULT_CONFIG} when it exists)")

    rollback = sub.add_parser("rollback", parents=[common, gated],
                              help="go back to the previous release")
    rollback.add_argument("--reason", default="operator rollback", help="recorded and reported")

    status = sub.add_parser("status", parents=[common], help="releases, current, last event")
    status.add_argument("--json", action="store_true", help="one JSON object")

    sub.add_parser("resume", parents=[common, gated],
                   help="finish an update interrupted by a reboot (gate it, or roll back)")
    update.set_defaults(func=run_update)


def run_update(args: argparse.Namespace) -> int:
    try:
        if args.update_command == "status":
            return _status(args)
        if args.update_command == "apply":
            return _apply(args)
        updater = _updater(args, keys=[])
        if args.update_command == "rollback":
            updater.rollback(args.reason, restart=not args.no_restart)
        else:
            updater.resume()
    except UpdateError as exc:
        _err(f"update {exc.event.outcome}: {exc.event.reason}")
        return 1
    except (BundleError, RuntimeError, ValueError) as exc:
        _err(f"update: {exc}")
        return 1
    return 0


def gate_policy(args: argparse.Namespace) -> GatePolicy:
    """The health gate an `update` command runs with (defaults for resume and rollback)."""
    return GatePolicy(ready_timeout_s=getattr(args, "ready_timeout", _GATE.ready_timeout_s),
                      healthy_for_s=getattr(args, "healthy_for", _GATE.healthy_for_s),
                      poll_s=getattr(args, "poll", _GATE.poll_s))


def _updater(args: argparse.Namespace, keys: Sequence[Ed25519PublicKey],
             shadow: ShadowGate | None = None) -> Updater:
    services: ServiceManager = NoServices() if args.no_restart else SystemctlManager(args.systemctl)
    gate = gate_policy(args)
    health_file: Path = getattr(args, "health_file", DEFAULT_HEALTH_FILE)
    systemctl: str = args.systemctl

    def probe_for(version: str) -> HealthProbe:
        return AllOf([HealthFileProbe(health_file, version, max_age_s=max(30.0, 4 * gate.poll_s)),
                      SystemctlProbe(NODE_UNIT, systemctl)])

    return Updater(args.root, public_keys=keys, services=services,
                   probe_for=probe_for, policy=UpdatePolicy(keep=getattr(args, "keep", 3),
                                                            gate=gate, shadow=shadow))


def _shadow_gate(args: argparse.Namespace) -> ShadowGate | None:
    """`update.shadow_gate` of the node's config, for `apply` with a bundle to install (nothing
    else installs). A `--config` given but missing fails closed: ConfigError."""
    path: Path | None = args.config
    if path is not None and not path.is_file():
        raise ConfigError("--config", str(path), "the node's config file (it holds "
                          "update.shadow_gate); the bundle is not installed without it")
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    if path is None:
        return None
    cfg = load_config(path)
    return ShadowGate.from_config(cfg.update.shadow_gate, Path(cfg.storage.state_dir))


def _pick_bundle(path: Path, settle_s: float) -> tuple[Path | None, list[Path]]:
    """(bundle to apply, every bundle looked at) for a file or an inbox folder; bundles
    changed in the last `settle_s` seconds are not looked at yet."""
    if not path.is_dir():
        return path, []
    settled_before = time.time() - settle_s
    found = []
    for p in path.iterdir():
        if not (p.is_file() and p.name.endswith(BUNDLE_SUFFIX)):
            continue
        if p.stat().st_mtime > settled_before:
            log.info("update_bundle_settling", bundle=str(p), settle_s=settle_s)
            continue
        found.append(p)
    found.sort(key=lambda p: (p.stat().st_mtime, p.name))
    return (found[-1] if found else None), found


def _apply(args: argparse.Namespace) -> int:
    bundle, seen = _pick_bundle(args.bundle, args.settle)
    if bundle is None:
        # Nothing new: still finish an update that a reboot or a kill interrupted, which
        # would otherwise wait for the next bundle.
        event = _updater(args, keys=[]).resume()
        if event is None:
            log.info("update_nothing_to_do", inbox=str(args.bundle))
            return 0
        _out(f"update resumed: {event.outcome} {event.version or ''} ({event.reason})")
        return 0 if event.outcome == "committed" else 1
    if not bundle.is_file():
        _err(f"update: no bundle at {bundle}")
        return 2
    updater = _updater(args, keys=list(load_public_keys(args.public_key)),
                       shadow=_shadow_gate(args))
    try:
        event = updater.apply(bundle, restart=not args.no_restart,
                              allow_downgrade=args.allow_downgrade)
    except UpdateBusyError:
        raise  # nothing was looked at: the next run takes the bundles
    except BaseException:
        _file_as_processed(seen, args.bundle)
        raise
    _file_as_processed(seen, args.bundle)
    _out(f"update committed: {event.version} ({event.reason})")
    return 0


def _file_as_processed(seen: list[Path], inbox: Path) -> None:
    """An inbox: never retry what was looked at."""
    if not seen:
        return
    done = inbox / "processed"
    done.mkdir(exist_ok=True)
    for p in seen:
        p.replace(done / p.name)


def _status(args: argparse.Namespace) -> int:
    store = ReleaseStore(args.root)
    last = store.last_event()
    current = store.current_version()
    releases = store.installed()
    if args.json:
        _out(json.dumps({
            "root": str(args.root),
            "current": current,
            "previous": store.previous_version(),
            "highest_installed": _highest(store),
            "pending": store.pending(),
            "releases": [
                {"version": i.version, "kind": i.kind, "status": i.status,
                 "installed_ms": i.installed_ms, "reason": i.reason,
                 "base_version": i.base_version}
                for i in releases
            ],
            "last_event": last.to_dict() if last else None,
        }, indent=1))
        return 0
    _out(f"current:  {current or '-'}\nprevious: {store.previous_version() or '-'}")
    for i in releases:
        mark = "*" if i.version == current else " "
        _out(f" {mark} {i.version:<24} {i.kind:<7} {i.status:<12} {i.reason}")
    if last:
        _out(f"last update: {last.outcome} {last.version or ''} — {last.reason}")
    return 0


def _highest(store: ReleaseStore) -> str | None:
    try:
        return store.highest_version()
    except BundleError as exc:  # status still answers; apply says what to do about it
        _err(f"update status: {exc}")
        return None


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m edge.commands.update update …` (the same commands `edge-node update` has)."""
    parser = argparse.ArgumentParser(prog="edge-node")
    add_update_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
