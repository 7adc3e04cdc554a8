"""When sync entries run: each `every` apart (the first one when the last saved run is that old), one run of an
entry at a time. A run due while the previous one still goes on (here, in another process, or on another
replica sharing the Redis index) is skipped and logged. `run_now` is also what `cargohold sync run` calls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import redis.asyncio as redis

from cargohold.config import Settings, SyncEntry
from cargohold.sync.run import Progress, Syncer
from cargohold.sync.state import EntryState, RunLock, dump, load, save
from cargohold.tasks import Tasks

log = logging.getLogger("cargohold.sync")


async def _quiet(state: EntryState, line: str) -> None:
    log.debug("sync %s: %s", state.name, line)


class Scheduler:
    """The sync entries of one instance and their states (for metrics and the status page)."""

    def __init__(self, settings: Settings, syncer: Syncer, tasks: Tasks, client: redis.Redis | None = None) -> None:
        self._data_dir: Path = settings.data_dir
        self._syncer = syncer
        self._tasks = tasks
        self._client = client
        self.entries: dict[str, SyncEntry] = dict(zip(settings.sync_names, settings.sync, strict=True))
        # A state saved as running by a process that died is not running here.
        self.states = {name: _stopped(load(self._data_dir, name)) for name in self.entries}
        self._saving = asyncio.Lock()
        self._active: set[str] = set()  # entries this process runs now

    async def run_now(self, name: str, progress: Progress = _quiet) -> EntryState | None:
        """Run entry `name` now and return its state; None when a run of it is still going on (skipped)."""
        entry = self.entries[name]
        lock = RunLock(self._data_dir, name, self._client, entry.every)
        if name in self._active or not await lock.acquire():
            self.states[name].skipped_runs += 1
            where = "" if name in self._active else " (in another process or replica)"
            log.warning("sync %s: the previous run still goes on%s: this run is skipped", name, where)
            return None
        self._active.add(name)
        try:
            state = self.states[name] = self.states[name].starting()
            await self._save(state)
            log.info("sync %s: started (%d image(s))", name, len(entry.images))

            async def report(state: EntryState, line: str) -> None:
                await progress(state, line)
                await self._save(state)

            try:
                await self._syncer.run(entry, state, report)
            except BaseException as exc:  # cancelled at shutdown, or a bug: the run is over all the same
                state.fail(f"the run stopped: {exc or type(exc).__name__}")
                raise
            finally:
                state.end()
                await self._save(state)
        finally:
            self._active.discard(name)
            await lock.release()
        level = logging.INFO if state.ok else logging.WARNING
        log.log(level, "sync %s: %s", name, summary(state))
        return state

    async def _save(self, state: EntryState) -> None:
        """The state as it is now, written off the loop, one write at a time (in the order asked)."""
        snapshot = dump(state)
        async with self._saving:
            await asyncio.get_running_loop().run_in_executor(None, save, self._data_dir, state.name, snapshot)

    def start(self) -> None:
        """Every entry on its own clock, its runs in the background, until the app's tasks close."""
        for name in self.entries:
            self._tasks.spawn(self._every(name), f"sync schedule {name}")

    async def _every(self, name: str) -> None:
        every = self.entries[name].every
        wait = max(0.0, (self.states[name].finished or 0.0) + every - time.time())
        while True:
            await asyncio.sleep(wait)
            wait = every
            self._tasks.spawn(self.run_now(name), f"sync {name}")  # a failure is logged there; the clock goes on


def _stopped(state: EntryState) -> EntryState:
    state.running = False
    return state


def summary(state: EntryState) -> str:
    """`12/12 tags, 2 new or moved, 5 blobs fetched (3.1 MiB)` and the first error, if any."""
    from cargohold.handlers.status import human

    text = (
        f"{state.tags_done}/{state.tags_total} tags, {state.tags_changed} new or moved, "
        f"{state.blobs_fetched} blobs fetched ({human(state.bytes_fetched)})"
    )
    if state.errors:
        text += f"; {len(state.errors)} error(s), first: {state.errors[0]}"
    return text
