"""`cargohold sync run [ENTRY]` and `cargohold sync status`, next to a running server on the same cache.

`run` syncs in this process through a pull-through cache of its own on the same data_dir (and Redis index), as
`cargohold import` writes next to a server; the entry's run lock keeps it from overlapping the server's runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from typing import TextIO

from cargohold.cache.backends import open_backends
from cargohold.cache.download import Downloads
from cargohold.cache.index import Index
from cargohold.cli.cache import _when, config_option
from cargohold.config import Settings
from cargohold.proxy import PullThrough
from cargohold.sync.run import Syncer
from cargohold.sync.schedule import Scheduler, summary
from cargohold.sync.state import EntryState, held, load, redis_of
from cargohold.tasks import Tasks
from cargohold.upstream.client import UpstreamClient
from cargohold.upstream.routing import Router


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    config = config_option()
    sync = commands.add_parser("sync", help="the sync lists: prefetch images on a schedule")
    sub = sync.add_subparsers(dest="sync_command", required=True)
    run = sub.add_parser("run", parents=[config], help="run sync entries now, with progress")
    run.add_argument("entry", nargs="?", help="the entry's name (default: every entry)")
    sub.add_parser("status", parents=[config], help="each entry's progress and last result")


def run(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.sync:
        _say("cargohold: no sync entries in the config", sys.stderr)
        return 1
    if args.sync_command == "status":
        return status(settings)
    names = settings.sync_names
    if args.entry is not None and args.entry not in names:
        _say(f"cargohold: no sync entry {args.entry!r} (entries: {', '.join(names)})", sys.stderr)
        return 1
    return asyncio.run(_run(settings, [args.entry] if args.entry else names))


def _say(line: str, stream: TextIO | None = None) -> None:
    """Command-line output, a whole line at a time (stdout unless `stream`)."""
    out = stream or sys.stdout
    out.write(line + "\n")
    out.flush()


def status(settings: Settings) -> int:
    for name in settings.sync_names:
        state = load(settings.data_dir, name)
        if held(settings.data_dir, name):
            _say(f"{name}: running, {state.tags_done}/{state.tags_total} tags")
        elif state.finished is None:
            _say(f"{name}: never run")
        else:
            result = "ok" if state.ok else "FAILED"
            _say(f"{name}: {result} {_when(state.finished)}: {summary(state)}")
        for error in state.errors:
            _say(f"  {error}")
        if state.skipped_runs:
            _say(f"  {state.skipped_runs} run(s) skipped: the previous one still went on")
    return 0


async def _show(state: EntryState, line: str) -> None:
    _say(f"{state.name} [{state.tags_done}/{state.tags_total}] {line}", sys.stderr)


async def _run(settings: Settings, names: list[str]) -> int:
    failed = 0
    async with _pull_through(settings) as (proxy, index, tasks):
        scheduler = Scheduler(settings, Syncer(settings, proxy), tasks, redis_of(index))
        for name in names:
            state = await scheduler.run_now(name, _show)
            if state is None:
                _say(f"{name}: skipped, a run of it is still going on", sys.stderr)
                failed += 1
                continue
            _say(f"{name}: {'ok' if state.ok else 'FAILED'}: {summary(state)}")
            failed += not state.ok
    return 1 if failed else 0


@contextlib.asynccontextmanager
async def _pull_through(settings: Settings) -> AsyncIterator[tuple[PullThrough, Index, Tasks]]:
    """A pull-through cache on the configured store and index, with its own upstream sessions and tasks."""
    async with open_backends(settings) as backends, Tasks() as tasks:
        clients = {u.name: UpstreamClient.connect(u) for u in settings.upstreams}
        store, index = backends.store, backends.index
        downloads = Downloads(store, index, tasks, max_blob_size=settings.max_blob_size)
        router = Router(clients, settings.default.name)
        try:
            yield PullThrough(router, store, index, downloads, tasks, backends.peers), index, tasks
        finally:
            for client in clients.values():
                await client.close()
