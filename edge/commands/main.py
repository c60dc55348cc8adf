"""`edge-node`: arguments -> config -> the node, and the tools around it."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from edge import __version__
from edge.app.process import tune_process
from edge.config import ConfigError

#: Sub-command groups that live beside their stage: (module, function registering them).
_COMMAND_GROUPS = (
    ("edge.commands.synth", "add_synth_commands"),
    ("edge.commands.run", "add_node_commands"),
    ("edge.commands.models", "add_model_commands"),
    ("edge.commands.update", "add_update_commands"),
    ("edge.commands.snapshots", "add_snapshot_commands"),
    ("edge.commands.replay", "add_replay_commands"),
    ("edge.commands.shadow", "add_shadow_commands"),
    ("edge.commands.opcua", "add_opcua_commands"),
    ("edge.commands.fleet", "add_fleet_commands"),
    ("edge.commands.train", "add_train_commands"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-node",
        description="conveyor-vision edge node: finds damaged items before the divert point.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name, func_name in _COMMAND_GROUPS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # that part of the product is not installed in this build
        register: Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None] = getattr(
            module, func_name)
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    tune_process()  # before the command modules load numpy
    parser = build_parser()
    args = parser.parse_args(argv)
    # Command groups set `handler` (or `func`, the argparse idiom some groups use).
    handler: Callable[[argparse.Namespace], int] = getattr(args, "handler", None) or args.func
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"edge-node: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
