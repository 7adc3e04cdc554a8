"""`cargohold serve | config check`."""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys

from aiohttp import web

from cargohold import __version__
from cargohold.config import ConfigError, Settings, load_settings, split_host_port


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
    return parser


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


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
    from cargohold.app import build_app
    from cargohold.badrequests import quiet_bad_requests
    from cargohold.middleware.observe import AccessLogger

    _setup_logging(settings.log_level)
    quiet_bad_requests()
    raise_open_files_limit()
    host, port = split_host_port(settings.listen)
    logging.getLogger("cargohold").info(
        "cargohold %s listening on %s, cache in %s, upstreams: %s",
        __version__,
        settings.listen,
        settings.data_dir,
        ", ".join(f"{u.name}={u.url}" for u in settings.upstreams),
    )
    web.run_app(
        build_app(settings),
        host=host,
        port=port,
        access_log_class=AccessLogger,
        access_log=logging.getLogger("cargohold.access"),
        print=None,
        shutdown_timeout=5,
        backlog=1024,
        # Bounds idle and slow-header (slowloris) connections: aiohttp closes a connection that
        # has no complete request this long after it opened or after its last response.
        keepalive_timeout=settings.idle_timeout,
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "config":
            settings = load_settings(args.file)
            print(f"{args.file}: ok ({len(settings.upstreams)} upstream(s), default {settings.default.name})")
            return 0
        settings = load_settings(args.config, overrides={"listen": args.listen, "data_dir": args.data_dir})
    except ConfigError as exc:
        print(f"cargohold: config error: {exc}", file=sys.stderr)
        return 2
    serve(settings)
    return 0
