"""`workers: N`: N serving processes on the same listeners and `data_dir`, under a small supervisor.

Each worker binds the listeners itself with SO_REUSEPORT, so the kernel spreads connections and no
worker depends on the supervisor to accept. What they share lives in `data_dir`: the SQLite index
(WAL), the blobs, the download locks (`cache/filelocks.py`) and the metrics files of
prometheus_client's multiprocess mode (`metrics/`). Worker 0 is the leader: it alone runs the
background work (eviction, ACME); when it dies its replacement takes over. The supervisor only forks,
restarts a worker that died (after a pause that doubles while it keeps dying young, so a crash loop
costs little) and, on SIGTERM/SIGINT, stops them all; a worker that cannot start (exit 2) stops the
whole machine with the same status.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from cargohold.cache.index import SqliteIndex
from cargohold.cache.store import Spool
from cargohold.config import ConfigError, Settings
from cargohold.metrics import MULTIPROC_ENV, forget_worker, share_across_workers

log = logging.getLogger("cargohold.workers")

RESTART_DELAY = 1.0  # seconds before a worker that died is started again; doubled while it keeps dying young
RESTART_DELAY_MAX = 30.0
YOUNG = 10.0  # a worker that dies within this many seconds of its start counts as a crash loop
STOP_GRACE = 15.0  # seconds for the workers' graceful stop before they are killed
POLL = 0.2
CANNOT_START = 2
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def metrics_dir(settings: Settings) -> Path:
    return settings.data_dir / "metrics"


class Supervisor:
    """Forks the workers and keeps their number until it is told to stop."""

    def __init__(self, settings: Settings, serve: Callable[[Settings], None]) -> None:
        self._settings = settings
        self._serve = serve
        self._children: dict[int, int] = {}  # pid -> slot
        self._started: dict[int, float] = {}  # slot -> when its worker started
        self._delays: dict[int, float] = {}  # slot -> pause before its next start
        self._stop_at: float | None = None
        self._status = 0

    def run(self) -> int:
        """Until every worker has stopped; the exit status of the machine."""
        self._settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        with open(self._settings.data_dir / "workers.lock", "w") as lock:
            try:  # held while the supervisor or any worker it started (they inherit it) lives
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.error("cannot start: another cargohold with workers serves %s", self._settings.data_dir)
                return CANNOT_START
            return self._run()

    def _run(self) -> int:
        shared = metrics_dir(self._settings)
        shutil.rmtree(shared, ignore_errors=True)  # counters start at zero with the machine, as with one process
        shared.mkdir(parents=True, mode=0o750)
        os.environ[MULTIPROC_ENV] = str(shared)
        if not self._settings.index.redis:  # created or migrated once: workers starting together would race to
            asyncio.run(SqliteIndex(self._settings.data_dir / "index.sqlite").close())
        # Once, here: a worker started again must not remove the temp files of the others' downloads.
        Spool(self._settings.data_dir).clean_temp()
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        count = self._settings.worker_count
        log.info("starting %d workers", count)
        for slot in range(count):
            self._spawn(slot)
        while self._children:
            self._reap()
        return self._status

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stop()

    def stop(self) -> None:
        if self._stop_at is None:
            self._stop_at = time.monotonic() + STOP_GRACE
            self._signal_all(signal.SIGTERM)

    def _signal_all(self, sig: signal.Signals) -> None:
        for pid in self._children:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:  # it has just exited; reaped next
                continue

    def _reap(self) -> None:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            if self._stop_at is not None and time.monotonic() > self._stop_at:
                log.warning("workers did not stop in %.0fs; killing them", STOP_GRACE)
                self._signal_all(signal.SIGKILL)
                self._stop_at = float("inf")
            time.sleep(POLL)
            return
        slot = self._children.pop(pid)
        forget_worker(metrics_dir(self._settings), pid)
        code = os.waitstatus_to_exitcode(status)
        if self._stop_at is not None:
            return
        if code == CANNOT_START:
            log.error("worker %d cannot start; stopping", slot)
            self._status = CANNOT_START
            self.stop()
            return
        young = time.monotonic() - self._started[slot] < YOUNG
        delay = min(self._delays.get(slot, RESTART_DELAY / 2) * 2, RESTART_DELAY_MAX) if young else RESTART_DELAY
        self._delays[slot] = delay
        log.warning("worker %d (pid %d) exited with status %d; starting it again in %.0fs", slot, pid, code, delay)
        time.sleep(delay)
        if self._stop_at is None:
            self._spawn(slot)

    def _spawn(self, slot: int) -> None:
        # Blocked across the fork: a signal must not run the supervisor's handler in the new worker.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        pid = os.fork()
        if pid:
            self._children[pid] = slot
            self._started[slot] = time.monotonic()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            return
        os._exit(self._worker(slot))

    def _worker(self, slot: int) -> int:
        """In the child: serve until stopped; the exit status."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)  # the event loop installs its own
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        share_across_workers()
        try:
            self._serve(self._settings.model_copy(update={"leader": slot == 0}))
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 1
        except ConfigError as exc:  # found at start-up (e.g. a bad htpasswd line): one line, as without workers
            log.error("config error: %s", exc)
            return CANNOT_START
        except BaseException:
            log.exception("worker %d failed", slot)
            return 1
        return 0


def supervise(settings: Settings, serve: Callable[[Settings], None]) -> int:
    """Run `serve` in `settings.worker_count` processes until SIGTERM/SIGINT; the exit status."""
    return Supervisor(settings, serve).run()
