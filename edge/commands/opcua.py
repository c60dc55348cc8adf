"""`edge-node opcua certs`: the OPC UA server's certificate and trust folders."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge.config import ConfigError, load_config
from edge.publish.opcua.certs import application_uri, default_hosts, write_certificates


def add_opcua_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    opcua = sub.add_parser("opcua", help="OPC UA for PLCs and SCADA")
    group = opcua.add_subparsers(dest="opcua_command", metavar="COMMAND", required=True)
    certs = group.add_parser(
        "certs", help="create the server certificate (self-signed), its key, and the "
        "trusted/ and rejected/ folders for client certificates")
    certs.add_argument("--out", type=Path, required=True, help="folder to write them to")
    certs.add_argument("--config", type=Path, default=None,
                       help="node config (its node and line IDs name the server)")
    certs.add_argument("--host", action="append", default=None, metavar="NAME_OR_IP",
                       help="a host name or address the clients connect to (repeat; default: "
                       "this machine's name, localhost, 127.0.0.1)")
    certs.add_argument("--days", type=int, default=5 * 365, help="validity in days")
    certs.add_argument("--force", action="store_true", help="replace an existing certificate")
    certs.set_defaults(handler=_certs)


def _certs(args: argparse.Namespace) -> int:
    if args.days < 1:
        raise ConfigError("--days", args.days, "a positive number of days")
    cfg = load_config(args.config)
    hosts = args.host or default_hosts()
    try:
        files = write_certificates(args.out, cfg.node, hosts, days=args.days, force=args.force)
    except FileExistsError as exc:
        print(f"edge-node: {exc}")
        return 1
    print(f"application URI: {application_uri(cfg.node)}\nhosts: {', '.join(hosts)}\n"
          f"certificate: {files.cert} (give it to the clients to trust)\nkey: {files.key}\n"
          f"client certificates to trust go into {files.trusted}; refused ones appear in "
          f"{files.rejected}\n\nopcua:\n  enabled: true\n  cert_file: {files.cert}\n"
          f"  key_file: {files.key}\n  trusted_dir: {files.trusted}")
    return 0
