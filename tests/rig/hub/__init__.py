"""A Docker Hub-like upstream for tests and benchmarks: the real distribution registry with
token auth, a token service like auth.docker.io, a counting reverse proxy in front (its URL
is what cargohold uses) and an optional "CDN" on another loopback host for blob redirects.

The aiohttp parts run on their own event loop in a background thread, so synchronous tests,
async tests and subprocess clients (docker, ctr, skopeo) can all use the hub at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import secrets
import shutil
import subprocess
import threading
from collections.abc import Awaitable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import yaml
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from rig import images as imgs
from rig.util import Managed, RigError, free_port, http_request, start_process, stop_process, tail, wait_until

from .cdn import Cdn
from .faults import Faults
from .front import Front
from .pushing import Pushing
from .quota import PullQuota
from .recording import Recording
from .records import Fault, Recorded
from .tokens import Tokens, libtrust_key_id

T = TypeVar("T")


class Hub(Recording, Faults, Tokens, Cdn, Front, Pushing, PullQuota, Managed):
    """A Docker Hub look-alike on loopback.

    Args:
        workdir: a temp dir for the registry's storage, config, cert and log.
        users: Basic-auth users of the token service (user -> password); they get push+pull.
        token_ttl: `expires_in` of issued tokens (and their JWT exp), seconds.
        redirect_blobs: answer blob GETs with 307 to the CDN on `cdn_host`.
        private_repos: repositories anonymous users may not pull.
        pull_limit: after this many manifest GETs per address or account, answer 429 TOOMANYREQUESTS (HEAD is
            free), like Docker Hub; ratelimit-* headers are sent while it is set (see quota.py).
        pull_retry_after: the Retry-After of that 429 (None: none, as Docker Hub mostly sends).
        cdn_reject_auth: the CDN answers 400 to requests carrying Authorization (as S3 does for
            presigned URLs), so a leaked token fails loudly; it is recorded either way.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        users: Mapping[str, str] | None = None,
        token_ttl: int = 300,
        redirect_blobs: bool = False,
        private_repos: Iterable[str] = ("acme/private",),
        pull_limit: int | None = None,
        pull_retry_after: int | None = 3600,
        cdn_reject_auth: bool = True,
        service: str = "registry.docker.io",
        issuer: str = "cargohold-rig-auth",
        host: str = "127.0.0.1",
        cdn_host: str = "127.0.0.2",
        registry_bin: str = "docker-registry",
    ) -> None:
        self.workdir = Path(workdir)
        self.users: dict[str, str] = dict(users if users is not None else {"pusher": "pushpass"})
        self.service = service
        self.issuer = issuer
        self.host = host
        self.cdn_host = cdn_host
        self.registry_bin = registry_bin
        self._defaults = {
            "token_ttl": token_ttl,
            "redirect_blobs": redirect_blobs,
            "private_repos": set(private_repos),
            "pull_limit": pull_limit,
            "pull_retry_after": pull_retry_after,
            "cdn_reject_auth": cdn_reject_auth,
            "users": dict(self.users),
        }
        self.token_ttl = token_ttl
        self.redirect_blobs = redirect_blobs
        #: With redirect_blobs, also answer blob HEADs with the 307 (off: HEAD answers 200 itself).
        self.redirect_blob_heads = False
        self.private_repos: set[str] = set(private_repos)
        self.pull_limit = pull_limit
        self.pull_retry_after = pull_retry_after
        self.cdn_reject_auth = cdn_reject_auth
        #: Pushed images by key (filled by `seed()` or by the caller).
        self.images: dict[str, imgs.Image] = {}

        self._lock = threading.Lock()
        self._records: list[Recorded] = []
        self._faults: list[Fault] = []
        self._pulls: dict[str, int] = {}
        self._refresh_tokens: dict[str, str] = {}
        self._cdn_secret = secrets.token_bytes(16)

        self._key = ec.generate_private_key(ec.SECP256R1())
        self._kid = libtrust_key_id(self._key.public_key())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runners: list[web.AppRunner] = []
        self._sites: dict[str, tuple[web.AppRunner, web.TCPSite | None, str, int]] = {}
        self._down: set[str] = set()
        self._session: aiohttp.ClientSession | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.registry_port = 0
        self.front_port = 0
        self.token_port = 0
        self.cdn_port = 0

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The front (counting proxy): what cargohold uses as its upstream url."""
        return f"http://{self.host}:{self.front_port}"

    @property
    def netloc(self) -> str:
        """`host:port` of the front, for image references (`{hub.netloc}/acme/tool:1.0`)."""
        return f"{self.host}:{self.front_port}"

    @property
    def token_url(self) -> str:
        """The token endpoint (the registry's Bearer realm)."""
        return f"http://{self.host}:{self.token_port}/token"

    @property
    def registry_url(self) -> str:
        """The registry itself, bypassing the front (not counted)."""
        return f"http://{self.host}:{self.registry_port}"

    @property
    def cdn_url(self) -> str:
        return f"http://{self.cdn_host}:{self.cdn_port}"

    @property
    def storage_dir(self) -> Path:
        return self.workdir / "storage"

    @property
    def log_path(self) -> Path:
        return self.workdir / "registry.log"

    def start(self, timeout: float = 20.0) -> Hub:
        """Start registry, token service, front and CDN; returns self."""
        if self._thread is not None:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_cert()
        loop = asyncio.new_event_loop()
        self._loop = loop
        ready = threading.Event()

        def _run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._thread = threading.Thread(target=_run, name="rig-hub-loop", daemon=True)
        self._thread.start()
        ready.wait(5)
        try:
            # token service and CDN first: the registry config needs the realm URL.
            self.run(self._start_aux(), timeout=timeout)
            self._start_registry(timeout)
            self.run(self._start_front(), timeout=timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop everything this hub started (bounded; safe to call twice)."""
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            with contextlib.suppress(Exception):  # keep tearing down
                self.run(self._astop(), timeout=15)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
        if loop is not None and not loop.is_running():
            loop.close()
        self._loop = None
        self._thread = None
        stop_process(self._proc)
        self._proc = None

    def run(self, coro: Awaitable[T], timeout: float | None = 600) -> T:
        """Run a coroutine on the hub's loop from another thread and wait for it."""
        if self._loop is None:
            raise RigError("hub is not started")
        if threading.current_thread() is self._thread:
            raise RigError("Hub.run() called from the hub loop itself; await the coroutine instead")
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        return fut.result(timeout)

    async def arun(self, coro: Awaitable[T]) -> T:
        """Await a coroutine on the hub's loop from another event loop (async tests)."""
        if self._loop is None:
            raise RigError("hub is not started")
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))  # type: ignore[arg-type]

    def reset(self) -> None:
        """Back to the constructor's settings: no faults, no counts, default flags, all up."""
        if self._down:
            self.set_down(False, tuple(self._down))
        self.clear_faults()
        self.reset_counts()
        self.token_ttl = self._defaults["token_ttl"]  # type: ignore[assignment]
        self.redirect_blobs = self._defaults["redirect_blobs"]  # type: ignore[assignment]
        self.redirect_blob_heads = False
        self.private_repos = set(self._defaults["private_repos"])  # type: ignore[call-overload]
        self.pull_limit = self._defaults["pull_limit"]  # type: ignore[assignment]
        self.pull_retry_after = self._defaults["pull_retry_after"]  # type: ignore[assignment]
        self.cdn_reject_auth = self._defaults["cdn_reject_auth"]  # type: ignore[assignment]
        self.users = dict(self._defaults["users"])  # type: ignore[call-overload]

    # -- internals ---------------------------------------------------------------------------------

    def _write_cert(self) -> None:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.issuer)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=365))
            .sign(self._key, hashes.SHA256())
        )
        (self.workdir / "token-cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def _registry_config(self, port: int) -> dict[str, Any]:
        return {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": f"{self.host}:{port}", "secret": secrets.token_hex(16)},
            "auth": {
                "token": {
                    "realm": self.token_url,
                    "service": self.service,
                    "issuer": self.issuer,
                    "rootcertbundle": str(self.workdir / "token-cert.pem"),
                }
            },
        }

    def _start_registry(self, timeout: float) -> None:
        if shutil.which(self.registry_bin) is None:
            raise RigError(f"{self.registry_bin} not found (apt-get install docker-registry)")
        last: Exception | None = None
        for _ in range(3):  # a free port can be taken between probe and bind: retry
            port = free_port(self.host)
            cfg = self.workdir / "registry.yml"
            cfg.write_text(yaml.safe_dump(self._registry_config(port)))
            proc = start_process([self.registry_bin, "serve", cfg], self.log_path)

            def _alive(p: subprocess.Popen[bytes] = proc) -> str | None:
                return None if p.poll() is None else f"registry exited {p.returncode}: {tail(self.log_path)}"

            def _ready(p: int = port) -> bool:
                return http_request("GET", f"http://{self.host}:{p}/v2/", timeout=2).status == 401

            try:
                wait_until(
                    _ready,
                    timeout=timeout,
                    what="docker-registry",
                    alive=_alive,
                )
            except RigError as exc:
                last = exc
                stop_process(proc)
                continue
            self._proc = proc
            self.registry_port = port
            return
        raise RigError(f"docker-registry did not start: {last}")

    async def _site(self, name: str, app: web.Application, host: str) -> int:
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, 0, backlog=1024)
        await site.start()
        self._runners.append(runner)
        port = int(runner.addresses[0][1])  # one site per runner: its bound port
        self._sites[name] = (runner, site, host, port)
        return port

    async def _set_down(self, name: str, down: bool) -> None:
        runner, site, host, port = self._sites[name]
        if down and site is not None:
            self._down.add(name)
            await site.stop()
            srv = runner.server
            for handler in list(srv.connections) if srv is not None else []:
                handler.force_close()
                if handler.transport is not None:
                    handler.transport.abort()
            self._sites[name] = (runner, None, host, port)
        elif not down and site is None:
            site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
            await site.start()
            self._sites[name] = (runner, site, host, port)
            self._down.discard(name)

    def set_down(self, down: bool = True, services: Iterable[str] = ("registry",)) -> None:
        """Take services ("registry" = the front, "token", "cdn") off the network: their port
        refuses connections and open connections are cut; set_down(False) brings them back
        on the same port."""
        for name in services:
            self.run(self._set_down(name, down))

    @contextlib.contextmanager
    def down(self, services: Iterable[str] = ("registry",)) -> Iterator[None]:
        """`with hub.down(): ...` the upstream is unreachable inside the block."""
        services = tuple(services)
        self.set_down(True, services)
        try:
            yield
        finally:
            self.set_down(False, services)

    def _is_down(self, name: str, request: web.Request) -> bool:
        """A request that slipped in on a connection opened before set_down: cut it."""
        if name in self._down:
            if request.transport is not None:
                request.transport.abort()
            return True
        return False

    async def _start_aux(self) -> None:
        token = web.Application()
        token.router.add_get("/token", self._token_get)
        token.router.add_post("/token", self._token_post)
        self.token_port = await self._site("token", token, self.host)
        cdn = web.Application()
        cdn.router.add_route("GET", "/{tail:.*}", self._cdn)  # GET routes answer HEAD too
        self.cdn_port = await self._site("cdn", cdn, self.cdn_host)

    async def _start_front(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=False),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        front = web.Application(client_max_size=1 << 40)
        front.router.add_route("*", "/{tail:.*}", self._front)
        self.front_port = await self._site("registry", front, self.host)

    async def _astop(self) -> None:
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        self._sites.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None


__all__ = ["Fault", "Hub", "Recorded", "libtrust_key_id"]
