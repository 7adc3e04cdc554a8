"""Start-up: the app on `listen` (HTTPS when `tls` is configured), the plain-HTTP listener on
`http_listen`, the certificate's reload or ACME schedule, and a graceful stop on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web

from cargohold import __version__
from cargohold.app import build_app
from cargohold.config import Settings, split_host_port
from cargohold.eventloop import LoopUnavailable, loop_factory, loop_name
from cargohold.keys import SETTINGS
from cargohold.logs import ACCESS_LOGGER
from cargohold.middleware.observe import AccessLogger
from cargohold.tasks import Tasks
from cargohold.tls.acme import AcmeManager
from cargohold.tls.context import CertReloader
from cargohold.tls.plain import plain_http_app
from cargohold.workers import STOP_SIGNALS, supervise

log = logging.getLogger("cargohold")

CERT_CHECK_INTERVAL = 2.0  # seconds between looks at tls.cert / tls.key for a renewed pair
SHUTDOWN_TIMEOUT = 5.0


class StartupError(Exception):
    """Cargohold cannot start (certificate files, a port in use); one line for the operator."""


@dataclass
class Https:
    """What the listeners need from TLS: the context (None = plain HTTP) and the HTTP-01 answers."""

    reloader: CertReloader | None = None
    challenges: dict[str, str] = field(default_factory=dict)

    @property
    def context(self) -> ssl.SSLContext | None:
        return self.reloader.context if self.reloader else None


@contextlib.asynccontextmanager
async def https(settings: Settings) -> AsyncIterator[Https]:
    """The certificate source for `listen`, with its background task for as long as cargohold serves."""
    tls = settings.tls
    # The listeners outlive the app, so their task has an owner of its own (the same kind as the app's).
    async with Tasks() as tasks:
        if tls.acme is not None:
            manager = AcmeManager(tls.acme, settings.data_dir / "acme")
            try:
                pair = (manager.cert_path, manager.key_path) if manager.has_certificate() else manager.placeholder()
            except OSError as exc:  # data_dir not writable for this user
                raise StartupError(f"tls.acme: cannot write {manager.dir}: {exc.strerror or exc}") from None
            reloader = CertReloader(*pair)
            # One worker orders and renews (the leader); the others load what it stores.
            schedule = manager.run(reloader) if settings.leader else manager.follow(reloader, CERT_CHECK_INTERVAL)
            tasks.spawn(schedule, "acme")
            yield Https(reloader, manager.challenges)
        elif tls.cert is not None and tls.key is not None:
            try:
                reloader = CertReloader(tls.cert, tls.key)
            except (OSError, ssl.SSLError) as exc:
                raise StartupError(f"tls.cert/tls.key: cannot load {tls.cert} with {tls.key}: {exc}") from None
            tasks.spawn(reloader.watch(CERT_CHECK_INTERVAL), "certificate reload")
            yield Https(reloader)
        else:
            yield Https()


async def _start(
    stack: contextlib.AsyncExitStack, app: web.Application, address: str, idle_timeout: float, **site: object
) -> None:
    runner = web.AppRunner(
        app,
        access_log_class=AccessLogger,
        access_log=logging.getLogger(ACCESS_LOGGER),
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        # Bounds idle and slow-header (slowloris) connections: aiohttp closes a connection that
        # has no complete request this long after it opened or after its last response.
        keepalive_timeout=idle_timeout,
    )
    # Pushed before setup: a start-up that fails half-way still unwinds the cleanup contexts it entered.
    stack.push_async_callback(runner.cleanup)
    try:
        await runner.setup()
    except OSError as exc:  # e.g. a data_dir this user cannot write
        where = f" {exc.filename}" if exc.filename else ""
        raise StartupError(f"cannot open{where}: {exc.strerror or exc}") from None
    host, port = split_host_port(address)
    reuse_port = app[SETTINGS].worker_count > 1  # every worker binds the same ports (SO_REUSEPORT)
    try:
        await web.TCPSite(runner, host, port, backlog=1024, reuse_port=reuse_port, **site).start()  # type: ignore[arg-type]
    except OSError as exc:
        raise StartupError(f"cannot listen on {address}: {exc.strerror or exc}") from None


async def serve_until_stopped(settings: Settings) -> None:
    """Listen on every configured address until SIGTERM or SIGINT, then stop gracefully."""
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stopped.set)
    try:
        await _serve(settings, stopped)
    finally:
        _ignore_stop_signals(loop)


def _ignore_stop_signals(loop: asyncio.AbstractEventLoop) -> None:
    """Once stopped, a late second SIGTERM (a supervisor's and a process group's) is ignored. Removed
    here, not by the loop's close: that closes the loop's wakeup pipe first, and a signal between the two
    is written to a closed descriptor ("Exception ignored ... signal wakeup fd", a traceback in the log)."""
    for sig in STOP_SIGNALS:
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)


async def _serve(settings: Settings, stopped: asyncio.Event) -> None:
    async with contextlib.AsyncExitStack() as stack:
        tls = await stack.enter_async_context(https(settings))
        await _start(stack, build_app(settings), settings.listen, settings.idle_timeout, ssl_context=tls.context)
        if settings.http_listen and settings.leader:  # redirects and ACME answers: the leader's
            https_port = split_host_port(settings.listen)[1]
            await _start(
                stack, plain_http_app(settings, tls.challenges, https_port), settings.http_listen, settings.idle_timeout
            )
        log.info(
            "cargohold %s listening on %s://%s%s, cache in %s, event loop %s, upstreams: %s",
            __version__,
            "https" if tls.context else "http",
            settings.listen,
            f" and http://{settings.http_listen}" if settings.http_listen else "",
            settings.data_dir,
            loop_name(settings),
            ", ".join(f"{u.name}={u.url}" for u in settings.upstreams),
        )
        await stopped.wait()
        log.info("stopping")


def run(settings: Settings) -> None:
    """The `serve` command: returns after a graceful stop; exits with 2 when it cannot start."""
    if settings.worker_count > 1:
        raise SystemExit(supervise(settings, serve_one))
    serve_one(settings)


def serve_one(settings: Settings) -> None:
    """One serving process (of `workers`)."""
    try:
        factory = loop_factory(settings)
    except LoopUnavailable as exc:
        log.error("cannot start: %s", exc)
        raise SystemExit(2) from None
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(serve_until_stopped(settings))
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        raise SystemExit(2) from None
