"""`cargohold serve | config check | user ... | cache stats|ls|prune|rm|... | warm | sync run|status | node-setup`."""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys

from cargohold import __version__, nodesetup
from cargohold.cli import cache as cachecli
from cargohold.cli import sync as synccli
from cargohold.cli.user import UserCommandError, add_user_commands, run_user_command
from cargohold.config import ConfigError, Settings, load_settings
from cargohold.logs import setup_logging


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cargohold", description="A pull-through cache for OCI registries.")
    parser.add_argument("--version", action="version", version=f"cargohold {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the mirror")
    serve.add_argument("--config", default=os.environ.get("CARGOHOLD_CONFIG"), help="YAML config file")
    serve.add_argument("--listen", help="host:port to listen on (overrides the config)")
    serve.add_argument("--data-dir", help="cache directory (overrides the config)")

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate a config file and exit")
    check.add_argument("file")
    add_user_commands(commands)
    cachecli.add_commands(commands)
    synccli.add_commands(commands)
    nodesetup.add_commands(commands)
    return parser


def raise_open_files_limit() -> int:
    """Every client connection is a descriptor: lift the soft limit to the hard one; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        wanted = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            logging.getLogger("cargohold").warning("could not raise the open files limit above %d", soft)
    return soft


def serve(settings: Settings) -> None:
    from cargohold.badrequests import quiet_bad_requests
    from cargohold.serving import run

    setup_logging(settings.log_level, settings.log_format)
    quiet_bad_requests()
    raise_open_files_limit()
    run(settings)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "config":
            settings = load_settings(args.file)
            print(f"{args.file}: ok ({len(settings.upstreams)} upstream(s), default {settings.default.name})")
            return 0
        if args.command == "user":
            return run_user_command(args)
        if args.command == "node-setup":  # reads no config: a node agent needs none
            return nodesetup.run(args)
        overrides = {"listen": args.listen, "data_dir": args.data_dir} if args.command == "serve" else None
        settings = load_settings(args.config, overrides=overrides)
        if args.command in ("cache", "warm", "export", "import"):
            return cachecli.run(args, settings)
        if args.command == "sync":
            return synccli.run(args, settings)
        serve(settings)  # a ConfigError can also come from start-up (e.g. a bad htpasswd entry)
    except ConfigError as exc:
        print(f"cargohold: config error: {exc}", file=sys.stderr)
        return 2
    except UserCommandError as exc:
        print(f"cargohold: {exc}", file=sys.stderr)
        return 1
    return 0
