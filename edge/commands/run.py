"""`edge-node run | demo | check`: the production node, the demo and the doctor."""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
from pathlib import Path
from types import FrameType

import structlog

from edge.app.demo import DemoOptions, run_demo
from edge.app.doctor import run_checks
from edge.app.service import NodeService
from edge.config import Config, ConfigError, load_config
from edge.logs import configure_logging
from edge.publish.connection import load_credentials

log = structlog.get_logger(__name__)


def add_node_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser("run", help="run the production node")
    run.add_argument("--config", type=Path, required=True, help="node config YAML")
    run.set_defaults(handler=_run)

    demo = sub.add_parser("demo", help="the whole node on embedded defaults (synthetic belt)")
    demo.add_argument("--seconds", type=float, default=30.0, help="how long to run")
    demo.add_argument("--items-per-second", type=float, default=None, help="induct rate")
    demo.add_argument("--seed", type=int, default=0, help="synthetic world seed")
    demo.add_argument("--damage-rate", type=float, default=None,
                      help="fraction of damaged items (default: the config's, 1 in 1000)")
    demo.add_argument("--broker", default=None,
                      help="mqtt://HOST:PORT of an external broker (default: embedded mosquitto)")
    demo.add_argument("--summary-json", type=Path, default=None, help="write the summary here")
    demo.add_argument("--config", type=Path, default=None, help="start from this config")
    demo.add_argument("--quiet", action="store_true", help="no live view, summary only")
    demo.add_argument("--http-port", type=int, default=None,
                      help="serve /metrics and the live page on 127.0.0.1:PORT (0: any port)")
    demo.add_argument("--snapshots-dir", type=Path, default=None,
                      help="keep the audit snapshots here (default: deleted after the run)")
    demo.add_argument("--opcua-port", type=int, default=None,
                      help="serve OPC UA on opc.tcp://127.0.0.1:PORT (no security, anonymous)")
    demo.set_defaults(handler=_demo)

    check = sub.add_parser("check", help="doctor: config, calibration, models, cameras, broker")
    check.add_argument("--config", type=Path, required=True, help="node config YAML")
    check.add_argument("--timeout", type=float, default=5.0, help="broker connect timeout (s)")
    check.set_defaults(handler=_check)


def _logging(cfg: Config, level: str | None = None) -> None:
    configure_logging(level or cfg.logging.level, cfg.logging.format, node_id=cfg.node.node_id,
                      line_id=cfg.node.line_id)


def _demo(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    # The live view owns the terminal; logs only say what went wrong.
    _logging(cfg, "warning")
    opts = DemoOptions(seconds=args.seconds, items_per_second=args.items_per_second,
                       seed=args.seed, broker=args.broker, summary_json=args.summary_json,
                       damage_rate=args.damage_rate, quiet=args.quiet,
                       http_port=args.http_port, snapshots_dir=args.snapshots_dir,
                       opcua_port=args.opcua_port)
    run_demo(cfg, opts)
    return 0


def _check(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    _logging(cfg, "error")
    return run_checks(cfg, broker_timeout_s=args.timeout)


class _Signals:
    """SIGTERM/SIGINT and SIGHUP as two events, set outside the signal handlers.

    A Python signal handler runs in the main thread between two bytecodes, possibly while
    that thread holds the very lock `Event.set()` needs (inside `Event.wait`, which the main
    loop spends its life in): setting the event there deadlocks the node, so that SIGTERM
    never stops it (seen once in CI). Instead the C-level handler writes the signal number to
    a socket (`signal.set_wakeup_fd`) and a watcher thread sets the events.
    """

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.reload = threading.Event()
        self._read, self._write = socket.socketpair()
        self._write.setblocking(False)

    def install(self) -> None:
        """From the main thread (as `signal` requires)."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, _take_no_lock)
        signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="cv-signals", daemon=True).start()

    def _watch(self) -> None:
        while True:
            try:
                numbers = self._read.recv(64)
            except OSError:
                return
            if not numbers:
                return
            for number in numbers:
                if number in (signal.SIGTERM, signal.SIGINT):
                    self.stop.set()
                elif number == signal.SIGHUP:
                    self.reload.set()


def _take_no_lock(_sig: int, _frame: FrameType | None) -> None:
    """The Python-level handler: nothing (the watcher thread acts; see `_Signals`)."""


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    # Refused now (a ConfigError: exit 2), not after the models and cameras have loaded.
    load_credentials(cfg.mqtt)
    if cfg.opcua.enabled:  # imported only then, as asyncua takes a while to import
        from edge.publish.opcua.security import load_users
        load_users(cfg.opcua)
    _logging(cfg)
    signals = _Signals()
    signals.install()
    service = NodeService(cfg)
    try:
        return service.run(signals.stop, signals.reload)
    except ConfigError:
        raise  # exit 2 (main): a configuration restarting cannot fix
    except Exception as exc:
        log.exception("node_failed", error=str(exc))
        print(f"edge-node: {exc}", file=sys.stderr)
        return 1
