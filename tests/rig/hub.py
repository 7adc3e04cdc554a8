"""A Docker Hub-like upstream for tests and benchmarks: the real distribution registry with
token auth, a token service like auth.docker.io, a counting reverse proxy in front (its URL
is what cargohold uses) and an optional "CDN" on another loopback host for blob redirects.

The aiohttp parts run on their own event loop in a background thread, so synchronous tests,
async tests and subprocess clients (docker, ctr, skopeo) can all use the hub at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import re
import secrets
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import jwt
import yaml
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from multidict import CIMultiDict
from yarl import URL

from . import images as imgs
from .util import Managed, RigError, free_port, http_request, start_process, stop_process, tail, wait_until

T = TypeVar("T")

#: Headers that belong to one hop and are never forwarded by the front.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
_BLOB_RE = re.compile(r"^/v2/(?P<name>.+)/blobs/(?P<digest>sha256:[a-f0-9]{64})$")
_MANIFEST_RE = re.compile(r"^/v2/(?P<name>.+)/manifests/(?P<ref>[^/]+)$")
_CHUNK = 256 * 1024


@dataclass
class Recorded:
    """One request seen by the hub (front, token service or CDN)."""

    service: str  # "registry" (the front), "token" or "cdn"
    method: str
    path: str
    query_string: str
    query: list[tuple[str, str]]
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    remote: str | None
    time: float
    status: int | None = None
    bytes_sent: int = 0  # response body bytes written to the client
    user: str | None = None  # token service: the Basic-auth user, if any
    redirected_to: str | None = None  # front: the CDN location of a 307
    fault: str | None = None  # what injected fault (if any) shaped the answer
    aborted: bool = False  # the client went away, or a fault cut the connection

    @property
    def has_auth(self) -> bool:
        """Whether an Authorization header reached this service."""
        return "authorization" in self.headers

    def param(self, name: str) -> list[str]:
        return [v for k, v in self.query if k == name]


@dataclass
class Fault:
    """An injected misbehaviour for requests matching (service, method, path_regex).

    status/body/headers: answer with this instead of forwarding (OCI error JSON by default).
    delay: seconds to wait before handling. rate: bytes/second for the response body.
    corrupt: flip one byte of the body (same length). truncate: cut the connection after that
    many body bytes. reset: cut the connection without any answer. length_delta: the front
    declares a Content-Length this much off the real one (negative: the body is cut short at
    the declared length; positive: the connection closes once the real body is sent). times: how many matching
    requests it applies to (None = until cleared); `hits` counts them.
    hold: park matching requests before they are forwarded until `release()`;
    hold_after: send that many body bytes, then park until `release()` (a download "in flight").
    Parked requests are counted in `waiting`; they give up after hold_timeout seconds.
    """

    service: str = "registry"
    method: str | None = None
    path_regex: str | None = None
    status: int | None = None
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    rate: float | None = None
    corrupt: bool = False
    truncate: int | None = None
    length_delta: int = 0
    reset: bool = False
    hold: bool = False
    hold_after: int | None = None
    hold_timeout: float = 60.0
    times: int | None = None
    hits: int = 0
    waiting: int = 0
    gate: threading.Event = field(default_factory=threading.Event, repr=False)

    def release(self) -> None:
        """Let every held request (now and later) go on."""
        self.gate.set()

    def wait_waiting(self, n: int, timeout: float = 10.0) -> None:
        """Block until at least n requests are parked at this fault (bounded)."""
        deadline = time.monotonic() + timeout
        while self.waiting < n:
            if time.monotonic() > deadline:
                raise RigError(f"only {self.waiting} of {n} requests reached the held fault in {timeout}s")
            time.sleep(0.01)

    async def _park(self) -> None:
        self.waiting += 1
        try:
            deadline = time.monotonic() + self.hold_timeout
            while not self.gate.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        finally:
            self.waiting -= 1

    def matches(self, service: str, method: str, path: str) -> bool:
        if self.service != service or (self.times is not None and self.hits >= self.times):
            return False
        if self.method is not None and self.method.upper() != method:
            return False
        return self.path_regex is None or re.search(self.path_regex, path) is not None

    def describe(self) -> str:
        parts = [
            f"{k}={v!r}"
            for k, v in (
                ("status", self.status),
                ("delay", self.delay or None),
                ("rate", self.rate),
                ("corrupt", self.corrupt or None),
                ("truncate", self.truncate),
                ("length_delta", self.length_delta or None),
                ("reset", self.reset or None),
                ("hold", self.hold or None),
                ("hold_after", self.hold_after),
            )
            if v is not None
        ]
        return "Fault(" + ", ".join(parts) + ")"


def libtrust_key_id(public_key: Any) -> str:
    """The libtrust key id distribution uses for `kid`: base32 of the first 240 bits of the
    SHA-256 of the DER SubjectPublicKeyInfo, in 12 groups of 4 joined by ':'."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode()
    return ":".join(b32[i : i + 4] for i in range(0, 48, 4))


def _oci_error(code: str, message: str, status: int, headers: Mapping[str, str] | None = None) -> web.Response:
    body = json.dumps({"errors": [{"code": code, "message": message, "detail": None}]})
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)


_STATUS_CODES = {
    400: "UNSUPPORTED",
    401: "UNAUTHORIZED",
    403: "DENIED",
    404: "NAME_UNKNOWN",
    429: "TOOMANYREQUESTS",
    500: "UNKNOWN",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "UNAVAILABLE",
}


class Hub(Managed):
    """A Docker Hub look-alike on loopback.

    Args:
        workdir: a temp dir for the registry's storage, config, cert and log.
        users: Basic-auth users of the token service (user -> password); they get push+pull.
        token_ttl: `expires_in` of issued tokens (and their JWT exp), seconds.
        redirect_blobs: answer blob GETs with 307 to the CDN on `cdn_host`.
        private_repos: repositories anonymous users may not pull.
        pull_limit: after this many manifest GETs, answer 429 TOOMANYREQUESTS (HEAD is free),
            like Docker Hub; ratelimit-* headers are sent while it is set.
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
            "cdn_reject_auth": cdn_reject_auth,
            "users": dict(self.users),
        }
        self.token_ttl = token_ttl
        self.redirect_blobs = redirect_blobs
        #: With redirect_blobs, also answer blob HEADs with the 307 (off: HEAD answers 200 itself).
        self.redirect_blob_heads = False
        self.private_repos: set[str] = set(private_repos)
        self.pull_limit = pull_limit
        self.cdn_reject_auth = cdn_reject_auth
        #: Pushed images by key (filled by `seed()` or by the caller).
        self.images: dict[str, imgs.Image] = {}

        self._lock = threading.Lock()
        self._records: list[Recorded] = []
        self._faults: list[Fault] = []
        self._manifest_gets = 0
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
            try:
                self.run(self._astop(), timeout=15)
            except Exception:  # noqa: BLE001 - keep tearing down
                pass
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
        self.cdn_reject_auth = self._defaults["cdn_reject_auth"]  # type: ignore[assignment]
        self.users = dict(self._defaults["users"])  # type: ignore[call-overload]

    # -- recording ------------------------------------------------------------------------------

    @property
    def requests(self) -> list[Recorded]:
        """A snapshot of every request recorded since the last reset (all services)."""
        with self._lock:
            return list(self._records)

    def requests_matching(
        self,
        method: str | None = None,
        path_regex: str | None = None,
        *,
        service: str | None = "registry",
        status: int | None = None,
        has_auth: bool | None = None,
    ) -> list[Recorded]:
        """Recorded requests filtered by service (None = any), method, path regex, status, auth."""
        out = []
        for r in self.requests:
            if service is not None and r.service != service:
                continue
            if method is not None and r.method != method.upper():
                continue
            if path_regex is not None and not re.search(path_regex, r.path):
                continue
            if status is not None and r.status != status:
                continue
            if has_auth is not None and r.has_auth != has_auth:
                continue
            out.append(r)
        return out

    def count(
        self,
        method: str | None = None,
        path_regex: str | None = None,
        *,
        service: str | None = "registry",
        status: int | None = None,
        has_auth: bool | None = None,
    ) -> int:
        """How many recorded requests match (default: requests that reached the front)."""
        return len(self.requests_matching(method, path_regex, service=service, status=status, has_auth=has_auth))

    def manifest_count(self, method: str | None = None, repo: str | None = None) -> int:
        """Requests for manifests (optionally of one repo) that reached the front."""
        rx = rf"^/v2/{re.escape(repo)}/manifests/" if repo else r"^/v2/.+/manifests/"
        return self.count(method, rx)

    def blob_count(self, method: str | None = None, digest: str | None = None) -> int:
        """Blob requests that reached the front (optionally for one digest)."""
        rx = rf"/blobs/{re.escape(digest)}$" if digest else r"/blobs/sha256:[a-f0-9]{64}$"
        return self.count(method, rx)

    def bytes_sent(self, path_regex: str | None = None, *, service: str | None = None) -> int:
        """Body bytes the hub (front and CDN by default) sent for matching requests."""
        rs = self.requests_matching(None, path_regex, service=service)
        return sum(r.bytes_sent for r in rs if r.service != "token")

    @property
    def cdn_requests(self) -> list[Recorded]:
        return self.requests_matching(service="cdn")

    @property
    def token_requests(self) -> list[Recorded]:
        return self.requests_matching(service="token")

    def reset_counts(self) -> None:
        """Forget recorded requests and the pull-limit counter."""
        with self._lock:
            self._records.clear()
            self._manifest_gets = 0

    def _record(self, service: str, request: web.Request) -> Recorded:
        headers: dict[str, str] = {}
        for k, v in request.headers.items():
            k = k.lower()
            headers[k] = f"{headers[k]}, {v}" if k in headers else v
        rec = Recorded(
            service=service,
            method=request.method,
            path=request.path,
            query_string=request.query_string,
            query=list(request.query.items()),
            headers=headers,
            remote=request.remote,
            time=time.time(),
        )
        with self._lock:
            self._records.append(rec)
        return rec

    # -- faults -----------------------------------------------------------------------------------

    def inject(self, **kwargs: Any) -> Fault:
        """Add a Fault (see its doc); the first matching fault applies. Returns it (see .hits)."""
        f = Fault(**kwargs)
        with self._lock:
            self._faults.append(f)
        return f

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, service: str, request: web.Request) -> Fault | None:
        with self._lock:
            for f in self._faults:
                if f.matches(service, request.method, request.path):
                    f.hits += 1
                    return f
        return None

    async def _pre_fault(self, fault: Fault | None, request: web.Request, rec: Recorded) -> web.StreamResponse | None:
        """Apply the request-level part of a fault; a response means: answer this."""
        if fault is None:
            return None
        rec.fault = fault.describe()
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.hold:
            await fault._park()  # noqa: SLF001
        if fault.reset:
            rec.aborted = True
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError  # nothing more to say on a dead connection
        if fault.status is not None:
            rec.status = fault.status
            if fault.body is not None:
                resp = web.Response(status=fault.status, body=fault.body, headers=dict(fault.headers))
            else:
                code = _STATUS_CODES.get(fault.status, "UNKNOWN")
                resp = _oci_error(code, f"injected fault {fault.status}", fault.status, dict(fault.headers))
            return resp
        return None

    async def _pump(
        self,
        chunks: AsyncIterator[bytes],
        resp: web.StreamResponse,
        request: web.Request,
        fault: Fault | None,
        rec: Recorded,
    ) -> None:
        """Copy a body to the client chunk by chunk, applying rate/corrupt/truncate faults."""
        started = time.monotonic()
        corrupted = False
        held = False
        try:
            async for chunk in chunks:
                if not chunk:
                    continue
                if (
                    fault is not None
                    and fault.hold_after is not None
                    and not held
                    and rec.bytes_sent + len(chunk) >= fault.hold_after
                ):
                    cut = fault.hold_after - rec.bytes_sent
                    head, chunk = chunk[:cut], chunk[cut:]
                    if head:
                        await resp.write(head)
                        rec.bytes_sent += len(head)
                    held = True
                    await fault._park()  # noqa: SLF001
                    if not chunk:
                        continue
                if fault is not None:
                    if fault.truncate is not None and rec.bytes_sent + len(chunk) >= fault.truncate:
                        chunk = chunk[: max(0, fault.truncate - rec.bytes_sent)]
                        if chunk:
                            await resp.write(chunk)
                            rec.bytes_sent += len(chunk)
                        rec.aborted = True
                        if request.transport is not None:
                            request.transport.abort()
                        return
                    if fault.corrupt and not corrupted:
                        chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                        corrupted = True
                if fault is None or not fault.rate:
                    await resp.write(chunk)
                    rec.bytes_sent += len(chunk)
                    continue
                # Throttled: small pieces, each sent no earlier than its last byte is due.
                step = max(1, int(fault.rate / 20))
                for i in range(0, len(chunk), step):
                    piece = chunk[i : i + step]
                    due = (rec.bytes_sent + len(piece)) / fault.rate - (time.monotonic() - started)
                    if due > 0:
                        await asyncio.sleep(due)
                    await resp.write(piece)
                    rec.bytes_sent += len(piece)
        except (ConnectionError, aiohttp.ClientConnectionError):
            rec.aborted = True

    # -- tokens -----------------------------------------------------------------------------------

    def mint_token(
        self,
        access: Iterable[tuple[str, str, Iterable[str]]] = (),
        *,
        subject: str = "",
        ttl: int | None = None,
        audience: str | None = None,
    ) -> str:
        """A registry JWT for (type, name, actions) entries, signed like auth.docker.io's."""
        now = int(time.time())
        ttl = self.token_ttl if ttl is None else ttl
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": audience or self.service,
            "exp": now + ttl,
            "nbf": now - 5,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": [{"type": t, "name": n, "actions": sorted(set(a))} for t, n, a in access],
        }
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self._kid})

    def _allowed(self, user: str | None, typ: str, name: str) -> set[str]:
        if typ != "repository":
            return {"*"} if user else set()
        if user:
            return {"pull", "push", "delete", "*"}
        return set() if name in self.private_repos else {"pull"}

    @staticmethod
    def _parse_scopes(raw: Iterable[str]) -> list[tuple[str, str, list[str]]]:
        out = []
        for item in raw:
            for scope in item.split():
                typ, _, rest = scope.partition(":")
                name, _, actions = rest.rpartition(":")
                if typ and name:
                    out.append((typ, name, [a for a in actions.split(",") if a]))
        return out

    def _grant(self, user: str | None, scopes: list[tuple[str, str, list[str]]]) -> list[tuple[str, str, list[str]]]:
        granted = []
        for typ, name, actions in scopes:
            allowed = self._allowed(user, typ, name)
            granted.append((typ, name, [a for a in actions if a in allowed]))
        return granted

    def _token_body(
        self, user: str | None, scopes: list[tuple[str, str, list[str]]], service: str | None
    ) -> dict[str, Any]:
        token = self.mint_token(self._grant(user, scopes), subject=user or "", audience=service or self.service)
        issued = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
        return {"token": token, "access_token": token, "expires_in": self.token_ttl, "issued_at": issued}

    async def _token_get(self, request: web.Request) -> web.StreamResponse:
        if self._is_down("token", request):
            raise asyncio.CancelledError
        rec = self._record("token", request)
        fault = self._take_fault("token", request)
        early = await self._pre_fault(fault, request, rec)
        if early is not None:
            return early
        user: str | None = None
        auth = request.headers.get("Authorization")
        if auth:
            try:
                scheme, _, b64 = auth.partition(" ")
                if scheme.lower() != "basic":
                    raise ValueError(scheme)
                user, _, password = base64.b64decode(b64).decode().partition(":")
            except (ValueError, binascii.Error, UnicodeDecodeError):
                rec.status = 401
                return web.json_response({"details": "malformed Authorization header"}, status=401)
            rec.user = user
            if self.users.get(user) != password:
                rec.status = 401
                return web.json_response({"details": "incorrect username or password"}, status=401)
        body = self._token_body(
            user, self._parse_scopes(request.query.getall("scope", [])), request.query.get("service")
        )
        if user and request.query.get("offline_token") == "true":
            rt = secrets.token_urlsafe(16)
            self._refresh_tokens[rt] = user
            body["refresh_token"] = rt
        rec.status = 200
        return web.json_response(body)

    async def _token_post(self, request: web.Request) -> web.StreamResponse:
        """OAuth2 form flavour (containerd uses it when it has credentials)."""
        if self._is_down("token", request):
            raise asyncio.CancelledError
        rec = self._record("token", request)
        fault = self._take_fault("token", request)
        early = await self._pre_fault(fault, request, rec)
        if early is not None:
            return early
        form = await request.post()
        grant = form.get("grant_type")
        user: str | None
        if grant == "password":
            user = str(form.get("username", ""))
            if self.users.get(user) != form.get("password"):
                rec.status = 401
                return web.json_response({"details": "incorrect username or password"}, status=401)
        elif grant == "refresh_token":
            user = self._refresh_tokens.get(str(form.get("refresh_token", "")))
            if user is None:
                rec.status = 401
                return web.json_response({"details": "invalid refresh token"}, status=401)
        else:
            rec.status = 400
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        rec.user = user
        body = self._token_body(
            user, self._parse_scopes([str(form.get("scope", ""))]), str(form.get("service", "")) or None
        )
        if form.get("access_type") == "offline":
            rt = secrets.token_urlsafe(16)
            self._refresh_tokens[rt] = user
            body["refresh_token"] = rt
        rec.status = 200
        return web.json_response(body)

    def get_token(self, *scopes: str, creds: tuple[str, str] | None = None) -> dict[str, Any]:
        """GET a token from the token service over HTTP (recorded), e.g. for a direct test."""
        q = "&".join([f"service={self.service}"] + [f"scope={s}" for s in scopes])
        headers = {}
        if creds:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        res = http_request("GET", f"{self.token_url}?{q}", headers=headers)
        if res.status != 200:
            raise RigError(f"token service said {res.status}: {res.body[:200]!r}")
        return res.json()  # type: ignore[return-value]

    # -- CDN --------------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        """Where the registry keeps a blob's bytes on disk (filesystem driver layout)."""
        algo, _, hexd = digest.partition(":")
        return self.storage_dir / "docker/registry/v2/blobs" / algo / hexd[:2] / hexd / "data"

    def _cdn_sign(self, path: str, expires: int) -> str:
        return hmac.new(self._cdn_secret, f"{path}:{expires}".encode(), hashlib.sha256).hexdigest()

    def cdn_location(self, digest: str, ttl: int = 600) -> str:
        """A presigned CDN URL for a blob, like Docker Hub's redirects to its CDN."""
        path = f"/registry-v2/docker/registry/v2/blobs/sha256/{digest[7:9]}/{digest[7:]}/data"
        expires = int(time.time()) + ttl
        return f"{self.cdn_url}{path}?expires={expires}&signature={self._cdn_sign(path, expires)}"

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        if self._is_down("cdn", request):
            raise asyncio.CancelledError
        rec = self._record("cdn", request)
        fault = self._take_fault("cdn", request)
        early = await self._pre_fault(fault, request, rec)
        if early is not None:
            return early
        m = re.match(r"^/registry-v2/docker/registry/v2/blobs/sha256/[a-f0-9]{2}/([a-f0-9]{64})/data$", request.path)
        if m is None:
            rec.status = 404
            return web.Response(status=404, text="NoSuchKey")
        if "Authorization" in request.headers and self.cdn_reject_auth:
            rec.status = 400
            return web.Response(
                status=400,
                content_type="application/xml",
                text="<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism allowed</Message></Error>",
            )
        try:
            expires = int(request.query.get("expires", "0"))
        except ValueError:
            expires = 0
        sig = request.query.get("signature", "")
        if expires < time.time() or not hmac.compare_digest(sig, self._cdn_sign(request.path, expires)):
            rec.status = 403
            return web.Response(
                status=403, content_type="application/xml", text="<Error><Code>AccessDenied</Code></Error>"
            )
        path = self.blob_path("sha256:" + m.group(1))
        if not path.exists():
            rec.status = 404
            return web.Response(status=404, text="NoSuchKey")
        size = path.stat().st_size
        if fault is None and request.method == "GET" and "Range" not in request.headers:
            rec.status = 200
            rec.bytes_sent = size
            return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})
        if "Range" in request.headers and fault is None:
            rec.status = 206
            return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/octet-stream"})
        resp.content_length = size
        rec.status = 200
        await resp.prepare(request)
        if request.method != "HEAD":
            await self._pump(_read_file(path), resp, request, fault, rec)
        if not rec.aborted:
            await resp.write_eof()
        return resp

    # -- the counting front -----------------------------------------------------------------------

    async def _front(self, request: web.Request) -> web.StreamResponse:
        if self._is_down("registry", request):
            raise asyncio.CancelledError
        rec = self._record("registry", request)
        fault = self._take_fault("registry", request)
        early = await self._pre_fault(fault, request, rec)
        if early is not None:
            return early
        assert self._session is not None
        method = request.method
        mm = _MANIFEST_RE.match(request.path)
        extra_headers: dict[str, str] = {}
        if mm and self.pull_limit is not None:
            with self._lock:
                if method == "GET":
                    self._manifest_gets += 1
                used = self._manifest_gets
            remaining = max(0, self.pull_limit - used)
            extra_headers = {
                "RateLimit-Limit": f"{self.pull_limit};w=21600",
                "RateLimit-Remaining": f"{remaining};w=21600",
                "Docker-RateLimit-Source": request.remote or "127.0.0.1",
            }
            if method == "GET" and used > self.pull_limit:
                rec.status = 429
                return _oci_error(
                    "TOOMANYREQUESTS",
                    "You have reached your pull rate limit.",
                    429,
                    extra_headers,
                )
        bm = _BLOB_RE.match(request.path)
        redirect = bool(
            self.redirect_blobs and bm and (method == "GET" or (method == "HEAD" and self.redirect_blob_heads))
        )
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP)
        data = request.content if request.body_exists else None
        if data is None:
            headers.popall("Content-Length", None)
        target = URL(self.registry_url + request.raw_path, encoded=True)
        skip = ("User-Agent", "Accept-Encoding", "Content-Type")
        try:
            if redirect:
                # Ask the registry (auth included) whether it would answer 200; only then redirect.
                async with self._session.head(
                    target, headers=headers, allow_redirects=False, skip_auto_headers=skip
                ) as probe:
                    if probe.status == 200:
                        assert bm is not None
                        loc = self.cdn_location(bm.group("digest"))
                        rec.status = 307
                        rec.redirected_to = loc
                        return web.Response(
                            status=307,
                            headers={
                                "Location": loc,
                                "Docker-Distribution-Api-Version": "registry/2.0",
                                "Content-Type": "text/html; charset=utf-8",
                            },
                        )
            up_cm = self._session.request(
                method, target, headers=headers, data=data, allow_redirects=False, skip_auto_headers=skip
            )
            async with up_cm as up:
                rec.status = up.status
                resp = web.StreamResponse(status=up.status, reason=up.reason)
                for k, v in up.headers.items():
                    kl = k.lower()
                    if kl not in HOP_BY_HOP and kl != "content-length":
                        resp.headers.add(k, v)
                for k, v in extra_headers.items():
                    resp.headers[k] = v
                cl = up.headers.get("Content-Length")
                delta = fault.length_delta if fault is not None else 0
                if cl is not None:
                    resp.content_length = int(cl) + delta
                await resp.prepare(request)
                if method != "HEAD":
                    await self._pump(up.content.iter_chunked(_CHUNK), resp, request, fault, rec)
                if delta > 0 and method != "HEAD" and request.transport is not None:
                    rec.aborted = True  # the promised extra bytes never come
                    request.transport.abort()
                if not rec.aborted:
                    await resp.write_eof()
                return resp
        except (TimeoutError, aiohttp.ClientConnectionError) as exc:
            if rec.aborted:
                raise asyncio.CancelledError from exc
            rec.status = 502
            return _oci_error("UNAVAILABLE", f"hub front: registry unreachable: {exc}", 502)

    # -- pushing -----------------------------------------------------------------------------------

    def push_token(self, repo: str) -> str:
        return self.mint_token([("repository", repo, ["pull", "push", "delete"])], subject="rig")

    async def _push_on_loop(
        self, image: imgs.Image, repo: str, tag: str | None, chunk_size: int | None = None
    ) -> imgs.Image:
        assert self._session is not None
        headers = {"Authorization": f"Bearer {self.push_token(repo)}"}
        return await imgs.push_image(
            self._session, self.registry_url, repo, tag, image, headers=headers, chunk_size=chunk_size
        )

    def push_image(
        self, image: imgs.Image, repo: str, tag: str | None = "latest", *, chunk_size: int | None = None
    ) -> imgs.Image:
        """Push an image straight to the registry (not counted); returns it with repo/tag set.

        chunk_size: use chunked PATCH uploads of that many bytes instead of one PUT.
        """
        return self.run(self._push_on_loop(image, repo, tag, chunk_size))

    async def apush_image(
        self, image: imgs.Image, repo: str, tag: str | None = "latest", *, chunk_size: int | None = None
    ) -> imgs.Image:
        """push_image for async tests (runs on the hub loop, awaited from yours)."""
        return await self.arun(self._push_on_loop(image, repo, tag, chunk_size))

    def push_tag(self, repo: str, tag: str, manifest: imgs.Image | bytes, media_type: str | None = None) -> str:
        """Point `repo:tag` at a manifest whose blobs/children already exist in repo (retagging)."""
        if isinstance(manifest, imgs.Image):
            data, mt = manifest.manifest, manifest.media_type
        else:
            data = manifest
            mt = media_type or json.loads(manifest).get("mediaType") or imgs.OCI_MANIFEST
        assert mt is not None

        async def _go() -> str:
            assert self._session is not None
            headers = {"Authorization": f"Bearer {self.push_token(repo)}"}
            return await imgs.push_manifest(self._session, self.registry_url, repo, tag, data, mt, headers=headers)

        return self.run(_go())

    def delete_manifest(self, repo: str, digest: str) -> None:
        """Delete a manifest (and so every tag pointing at it) from the registry."""

        async def _go() -> None:
            assert self._session is not None
            headers = {"Authorization": f"Bearer {self.push_token(repo)}"}
            async with self._session.delete(f"{self.registry_url}/v2/{repo}/manifests/{digest}", headers=headers) as r:
                if r.status != 202:
                    raise RigError(f"delete {repo}@{digest}: {r.status} {await r.text()}")

        self.run(_go())

    def seed(self, cache_dir: Path, *, big_size: int | None = None) -> dict[str, imgs.Image]:
        """Build and push the standard test images (see images.standard_images) into self.images."""
        specs = imgs.standard_images(Path(cache_dir), big_size=big_size)

        async def _go() -> list[imgs.Image]:
            return list(await asyncio.gather(*(self._push_on_loop(s.image, s.repo, s.tag) for s in specs)))

        for spec, pushed in zip(specs, self.run(_go()), strict=True):
            self.images[spec.key] = pushed
        return self.images

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


async def _read_file(path: Path, chunk: int = _CHUNK) -> AsyncIterator[bytes]:
    """Chunks of a file without blocking the loop for long (reads are page-cache fast here)."""
    loop = asyncio.get_running_loop()
    with open(path, "rb") as f:
        while True:
            data = await loop.run_in_executor(None, f.read, chunk)
            if not data:
                return
            yield data


__all__ = ["Fault", "Hub", "Recorded", "libtrust_key_id"]
