"""Typed settings: YAML file < CARGOHOLD_* environment < command line.

Every problem (unknown key, bad value) becomes one `ConfigError` line that names the key,
raised before anything starts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from fnmatch import fnmatchcase
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

ENV_PREFIX = "CARGOHOLD_"
DOCKER_HUB = "docker.io"

_HOSTNAME = r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?"
_HOST = re.compile(rf"{_HOSTNAME}(:\d+)?")
_REALM_HOST = re.compile(rf"(\*\.)?{_HOSTNAME}(:\d{{1,5}})?")
_GLOB = re.compile(r"[a-z0-9._*?/-]{1,255}")
_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)d)?(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


class ConfigError(Exception):
    """A configuration problem, worded as one line that names the key."""


def parse_duration(value: Any) -> float:
    """Seconds from `90`, `"90s"`, `"10m"`, `"1h30m"` or `"2d"`."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s, 10m, 1h")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value).strip())
        if not match or not any(match.groups()):
            raise ValueError(f"invalid duration {value!r} (use e.g. 30s, 10m, 1h30m, 2d)")
        days, hours, minutes, secs = (float(g) if g else 0.0 for g in match.groups())
        seconds = days * 86400 + hours * 3600 + minutes * 60 + secs
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?)b?$", re.IGNORECASE)


def parse_size(value: Any) -> int:
    """Bytes from `1048576`, `"512MiB"`, `"50GiB"`, `"2GB"` (KiB/MiB are powers of 1024, KB/MB of 1000)."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 500MiB or 50GiB")
    if isinstance(value, int | float):
        size = float(value)
    else:
        match = _SIZE.match(str(value).strip())
        if not match:
            raise ValueError(f"invalid size {value!r} (use e.g. 500MiB, 50GiB, 2TB)")
        number, prefix, binary = match.groups()
        power = "kmgtp".find(prefix.lower()) + 1 if prefix else 0
        size = float(number) * (1024 if binary or not prefix else 1000) ** power
    if size < 0:
        raise ValueError("a size cannot be negative")
    return int(size)


Size = Annotated[int, BeforeValidator(parse_size)]


def yaml_word(value: Any) -> Any:
    """Undo YAML 1.1 reading a bare `off`/`on` (also yes/no) as a boolean where a word is expected.

    `preset: off` is how the docs spell it and how people type it, in a file or in CARGOHOLD_*; PyYAML
    hands over `False`. The boolean no longer says which word was written, so `False` becomes `off`
    and `True` `on`; a setting without such a word then fails on a word, not on a type.
    """
    if isinstance(value, bool):
        return "on" if value else "off"
    return value


Word = BeforeValidator(yaml_word)


class Strict(BaseModel):
    """Base for config sections: unknown keys are errors, values are never coerced silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"


def _all_match(values: list[str], pattern: str, what: str, expected: str) -> list[str]:
    """`values` if each one matches `pattern`, else a ValueError naming the first that does not."""
    for value in values:
        if not re.fullmatch(pattern, value):
            raise ValueError(f"invalid {what} {value!r} (expected {expected})")
    return values


class AcmeConfig(Strict):
    """Automatic certificates: HTTP-01 answered on `http_listen`, stored in data_dir/acme."""

    domains: list[str] = Field(min_length=1)
    email: str | None = None
    directory: str = LETS_ENCRYPT
    ca_bundle: Path | None = Field(default=None, description="CA file to trust for a private ACME directory")

    @field_validator("domains")
    @classmethod
    def _domains(cls, value: list[str]) -> list[str]:
        dns_name = r"([a-z0-9]([a-z0-9-]*[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]*[a-z0-9])?"
        return _all_match(value, dns_name, "domain", "a DNS name like registry.example.com")


class TlsConfig(Strict):
    """HTTPS on `listen`: certificate files (reloaded when they change) or ACME, not both."""

    cert: Path | None = None
    key: Path | None = None
    acme: AcmeConfig | None = None

    @model_validator(mode="after")
    def _one_source(self) -> TlsConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together")
        if self.cert is not None and self.acme is not None:
            raise ValueError("use either cert/key files or acme, not both")
        return self

    @property
    def enabled(self) -> bool:
        return self.cert is not None or self.acme is not None


class UpstreamConfig(Strict):
    """One registry that cargohold pulls through."""

    name: str = Field(description="the registry host clients think of, e.g. docker.io")
    url: str
    username: str | None = None
    password: SecretStr | None = None
    tag_ttl: Duration = 600.0
    hosts: list[str] = Field(default_factory=list, description="Host header names routed to this upstream")
    repositories: list[str] = Field(default_factory=lambda: ["**"], description="globs of repositories allowed")
    token_realms: list[str] | None = Field(default=None, description="hosts allowed as token realm")
    redirect_hosts: list[str] = Field(
        default_factory=list,
        description="hosts (CDNs) this upstream may redirect to, besides its own and built-in ones",
    )
    timeout: Duration = Field(30.0, gt=0, description="how long the upstream may stay silent (connect, between bytes)")
    failure_pause: Duration = Field(10.0, description="after a failure or a 429, fail fast (serve stale) this long")
    proxy: str | None = Field(default=None, description="HTTP(S) proxy URL for this upstream; wins over HTTPS_PROXY")
    offline: bool = Field(
        default=False, description="never contact this upstream: serve what is cached, whatever its age"
    )
    immutable_tags: list[str] = Field(
        default_factory=list,
        description="globs of tags (or repository:tag) that keep their first digest: a move upstream is not followed",
    )
    quota_reserve: str | int = Field(
        "10%",
        description="pulls (or a % of the limit) kept for clients: below it, nothing no client waits for spends one",
    )
    content_mirrors: list[str] = Field(
        default_factory=list,
        description="registries tried first for manifests by digest and blobs (verified, anonymous)",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:\d+)?", value):
            raise ValueError(f"invalid registry name {value!r} (expected a host name like ghcr.io)")
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _registry_url(value)

    @field_validator("proxy")
    @classmethod
    def _proxy(cls, value: str | None) -> str | None:
        parts = urlsplit(value or "")
        if value is not None and (parts.scheme not in ("http", "https") or not parts.hostname):
            # the value is not repeated: it may hold the proxy's password
            raise ValueError("invalid proxy url (expected http(s)://[user:password@]host:port)")
        return value

    @field_validator("quota_reserve")
    @classmethod
    def _quota_reserve(cls, value: str | int) -> str | int:
        if isinstance(value, bool) or (isinstance(value, int) and value < 0):
            raise ValueError(f"invalid quota_reserve {value!r} (a number of pulls, or a share like 10%)")
        if isinstance(value, int) or value.strip().isdigit():
            return int(value)
        match = re.fullmatch(r"(\d+(?:\.\d+)?)%", str(value).strip())
        if match is None or float(match.group(1)) > 100:
            raise ValueError(f"invalid quota_reserve {value!r} (a number of pulls, or a share like 10%)")
        return f"{match.group(1)}%"

    @field_validator("content_mirrors")
    @classmethod
    def _content_mirrors(cls, value: list[str]) -> list[str]:
        return [_registry_url(url) for url in value]

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        return _host_names(value, _HOST, "ghcr.mirror.example.com")

    @field_validator("token_realms")
    @classmethod
    def _token_realms(cls, value: list[str] | None) -> list[str] | None:
        return (
            None
            if value is None
            else _host_names(value, _REALM_HOST, "auth.docker.io, *.docker.io or auth.example.com:5001")
        )

    @field_validator("redirect_hosts")
    @classmethod
    def _redirect_hosts(cls, value: list[str]) -> list[str]:
        return _host_names(value, _REALM_HOST, "cdn.example.com, *.cloudfront.net or cdn.example.com:8443")

    @field_validator("repositories")
    @classmethod
    def _repositories(cls, value: list[str]) -> list[str]:
        for glob in value:
            if not _GLOB.fullmatch(glob):
                raise ValueError(f"invalid repository glob {glob!r} (use names with * and **, e.g. library/*)")
        return value

    def immutable(self, repository: str, tag: str) -> bool:
        """Whether `repository:tag` keeps its first digest: a glob with a `:` matches `repository:tag`, else the tag."""
        return any(fnmatchcase(f"{repository}:{tag}" if ":" in glob else tag, glob) for glob in self.immutable_tags)

    @model_validator(mode="after")
    def _credentials(self) -> UpstreamConfig:
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        return self


def _registry_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"invalid url {value!r} (expected http(s)://host[:port])")
    if parts.username or parts.password:
        raise ValueError("put credentials in username/password, not in the url")
    return value.rstrip("/")


def _host_names(value: list[str], pattern: re.Pattern[str], example: str) -> list[str]:
    """Host names lower-cased, each checked against `pattern`."""
    hosts = [h.strip().lower() for h in value]
    for host in hosts:
        if not pattern.fullmatch(host):
            raise ValueError(f"invalid host name {host!r} (expected e.g. {example})")
    return hosts


Preset = Annotated[Literal["off", "personal", "team", "medium"], Word]
Count = Annotated[int, Field(ge=0)]


class BudgetOverrides(Strict):
    """Rate-limit budgets that replace those of a preset; unset ones are inherited, 0 means unlimited."""

    preset: Preset | None = None
    requests_per_second: Count | None = None
    burst: Count | None = None
    blobs_per_second: Count | None = None
    blob_burst: Count | None = None
    connections: Count | None = None
    pulls_per_minute: Count | None = None
    pulls_per_hour: Count | None = None


def _local_or_redis(field: str, value: str, local: str) -> str:
    """`local` (this process or this disk), or a redis:// or rediss:// URL with a host (shared)."""
    parts = urlsplit(value)
    if value != local and (parts.scheme not in ("redis", "rediss") or not parts.hostname):
        raise ValueError(f"invalid {field} {value!r} (expected {local} or redis://host:port[/db])")
    return value


class RateLimitConfig(BudgetOverrides):
    """Request limits; `trusted_proxies` also decides whose X-Forwarded-For is believed."""

    preset: Preset = "team"
    trusted_proxies: list[IPv4Network | IPv6Network] = Field(default_factory=list)
    storage: str = "memory://"
    upstream_fetches: Count = 64
    users: dict[str, BudgetOverrides] = Field(default_factory=dict)
    groups: dict[str, BudgetOverrides] = Field(default_factory=dict)

    @field_validator("storage")
    @classmethod
    def _storage(cls, value: str) -> str:
        return _local_or_redis("storage", value, "memory://")


class AccessRule(Strict):
    """Who (users, groups; neither: everyone let in, anonymous too) may do what where (globs)."""

    users: list[str] = Field(default_factory=list, description='user names; "*" is any logged-in user')
    groups: list[str] = Field(default_factory=list)
    upstream: str = Field(default="*", description="glob on the upstream name, e.g. docker.io")
    repositories: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    actions: list[Annotated[Literal["pull"], Word]] = Field(default_factory=lambda: ["pull"], min_length=1)


class AuthConfig(Strict):
    """Logins: users in an htpasswd file, tokens from our /token, access rules per repository."""

    htpasswd: Path
    anonymous: bool | list[IPv4Network | IPv6Network] = False
    rules: list[AccessRule] | None = Field(default=None, description="unset: every user may pull everything")
    groups: dict[str, list[str]] = Field(default_factory=dict, description="group name -> user names")
    token_ttl: Duration = 300.0
    refresh_token_ttl: Duration = Field(
        30 * 86400.0, gt=0, description="how long a refresh token from POST /token is good for"
    )
    max_failed_logins: int = Field(default=10, ge=1)
    failed_login_window: Duration = 300.0

    @model_validator(mode="after")
    def _known_groups(self) -> AuthConfig:
        for rule in self.rules or []:
            unknown = [g for g in rule.groups if g not in self.groups]
            if unknown:
                raise ValueError(f"rules name groups not defined in auth.groups: {', '.join(unknown)}")
        return self


class StatusConfig(Strict):
    """The status page `/` and `/ready` for clients who are not logged in (see docs/security.md)."""

    public: bool = Field(
        default=False,
        description="show anonymous clients the whole status page (images, upstream URLs), /ready's checks and /metrics",
    )


class CacheConfig(Strict):
    """Bounds on the disk cache: least-recently-used content goes first (None: unbounded)."""

    max_size: Size | None = None
    max_age: Duration | None = None
    pin: list[str] = Field(
        default_factory=list,
        description="globs of upstream/repository[:tag] never evicted, e.g. docker.io/library/redis:7.*",
    )


class S3Config(Strict):
    """An S3-compatible bucket for blobs and manifests; credentials may also come from the AWS_* variables."""

    endpoint_url: str | None = Field(default=None, description="unset: AWS S3; e.g. http://minio:9000")
    bucket: str = Field(min_length=3, max_length=63)
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    prefix: str = Field(default="", description="key prefix inside the bucket, e.g. cargohold/")
    redirect: bool = Field(default=False, description="answer blob hits with a 307 to a presigned URL")

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"invalid endpoint_url {value!r} (expected http(s)://host[:port])")
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        """`cache`, `/cache/` -> `cache/`: keys are `<prefix>blobs/...`."""
        value = value.strip("/")
        return value + "/" if value else ""

    @model_validator(mode="after")
    def _credentials(self) -> S3Config:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("access_key_id and secret_access_key go together")
        return self


class StorageConfig(Strict):
    """Where blobs and manifests live: files in data_dir, or a bucket shared by replicas."""

    backend: Annotated[Literal["filesystem", "s3"], Word] = "filesystem"
    s3: S3Config | None = None

    @model_validator(mode="after")
    def _s3(self) -> StorageConfig:
        if self.backend == "s3" and self.s3 is None:
            raise ValueError("backend s3 needs an s3 section (bucket, endpoint_url, ...)")
        return self


class IndexConfig(Strict):
    """The cache index: SQLite in data_dir, or Redis shared by replicas (which also single-flights across them)."""

    url: str = "sqlite"
    peer_wait: Duration = Field(
        60.0, gt=0, description="how long to wait for another replica's download before fetching it too"
    )
    lease: Duration = Field(
        15.0, ge=1, description="a download lock's life without renewal: how long a dead replica holds others up"
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _local_or_redis("url", value, "sqlite")

    @property
    def redis(self) -> bool:
        return self.url != "sqlite"


class SyncEntry(Strict):
    """Images prefetched on a schedule and kept (pinned): tag globs are matched against the upstream's tag list."""

    name: str | None = Field(
        default=None, description="for `cargohold sync run NAME`; default: its position, 1, 2, ..."
    )
    images: list[str] = Field(
        min_length=1, description='e.g. library/postgres:16, "library/redis:7.*", ghcr.io/org/app'
    )
    every: Duration = Field(6 * 3600.0, ge=60, description="how often it runs")
    platforms: list[str] = Field(default_factory=list, description="platforms of multi-platform images; empty: all")
    tags: Literal["latest"] | Annotated[int, Field(ge=1, le=1000)] = Field(
        default="latest", description="for an image without a tag: latest, or the N newest tags (by version order)"
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        """The name makes file names in data_dir/sync and a Redis key: no `/`, no `..`, nothing hidden."""
        name = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
        return value if value is None else _all_match([value], name, "sync entry name", "e.g. db or team-1.2")[0]

    @field_validator("images")
    @classmethod
    def _images(cls, value: list[str]) -> list[str]:
        image = r"[a-z0-9][a-z0-9._/:-]*(:[A-Za-z0-9_.*?\[\]-]{1,128})?"
        return _all_match(value, image, "image", "e.g. library/redis:7.* or ghcr.io/org/app")

    @field_validator("platforms")
    @classmethod
    def _platforms(cls, value: list[str]) -> list[str]:
        platform = r"[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?"
        return _all_match(value, platform, "platform", "os/arch[/variant], e.g. linux/arm64")


def _default_upstreams() -> list[UpstreamConfig]:
    return [UpstreamConfig(name=DOCKER_HUB, url="https://registry-1.docker.io")]


class Settings(Strict):
    """The whole configuration of one cargohold instance."""

    listen: str = "127.0.0.1:5000"
    http_listen: str | None = None
    tls: TlsConfig = Field(default_factory=TlsConfig)
    data_dir: Path = Path("./data")
    upstreams: list[UpstreamConfig] = Field(default_factory=_default_upstreams, min_length=1)
    default_upstream: str | None = None
    log_level: Annotated[str, Word] = "info"
    log_format: Annotated[Literal["text", "json"], Word] = "text"
    metrics_listen: str | None = None
    cache: CacheConfig = Field(default_factory=CacheConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    rate_limit: RateLimitConfig = Field(default_factory=RateLimitConfig)
    auth: AuthConfig | None = None
    status: StatusConfig = Field(default_factory=StatusConfig)
    external_url: str | None = None
    idle_timeout: Duration = Field(
        75.0, gt=0, description="close a client connection that has not sent a complete request for this long"
    )
    send_timeout: Duration = Field(
        300.0, gt=0, description="cut a blob response whose client has taken no piece of it for this long"
    )
    max_blob_size: Size = Field(
        20 << 30, gt=0, description="the largest blob fetched from upstream; one that claims or sends more is refused"
    )
    offline: bool = Field(default=False, description="never contact any upstream (each upstream may also say offline)")
    sync: list[SyncEntry] = Field(default_factory=list, description="images prefetched on a schedule and pinned")

    @model_validator(mode="before")
    @classmethod
    def _offline_everywhere(cls, data: Any) -> Any:
        """`offline: true` at the top makes every upstream offline: the clients read their own config."""
        if not isinstance(data, dict) or data.get("offline") is not True:
            return data
        upstreams = data.get("upstreams") or [u.model_dump(exclude_none=True) for u in _default_upstreams()]
        if not isinstance(upstreams, list):
            return data
        marked = [
            u.model_copy(update={"offline": True})
            if isinstance(u, UpstreamConfig)
            else {**u, "offline": True}
            if isinstance(u, dict)
            else u
            for u in upstreams
        ]
        return {**data, "upstreams": marked}

    workers: int | Literal["auto"] = Field(
        1, description="serving processes on the same listeners and data_dir; auto = one per core"
    )
    loop: Annotated[Literal["auto", "asyncio", "uvloop"], Word] = Field(
        "auto", description="the event loop: auto = uvloop when serving HTTPS (where it measurably helps), else asyncio"
    )
    leader: bool = Field(
        True, description="internal, set by the supervisor of `workers`: this process runs the background work"
    )

    @field_validator("workers")
    @classmethod
    def _workers(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 256:
            raise ValueError("expected a number of processes from 1 to 256, or auto")
        return value

    @model_validator(mode="after")
    def _leader_is_internal(self) -> Settings:
        # The supervisor sets it with model_copy, which does not validate; a file or variable may not.
        if "leader" in self.model_fields_set:
            raise ValueError("leader is set by the supervisor of `workers`, not by configuration")
        return self

    @property
    def worker_count(self) -> int:
        """`workers` as a number: `auto` is the cores this process may run on."""
        if self.workers == "auto":
            return len(os.sched_getaffinity(0))
        return self.workers

    @field_validator("listen", "metrics_listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if value is not None:
            split_host_port(value)
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        if value.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError("expected one of debug, info, warning, error")
        return value.lower()

    @model_validator(mode="after")
    def _upstream_names(self) -> Settings:
        names = [u.name for u in self.upstreams]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise ValueError(f"upstream names must be unique, repeated: {', '.join(sorted(duplicates))}")
        if self.default_upstream is not None and self.default_upstream not in names:
            raise ValueError(f"default_upstream {self.default_upstream!r} is not the name of an upstream")
        hosts = [h for u in self.upstreams for h in u.hosts]
        shared = {h for h in hosts if hosts.count(h) > 1}
        if shared:
            raise ValueError(f"a host name routes to one upstream only, repeated: {', '.join(sorted(shared))}")
        return self

    @model_validator(mode="after")
    def _serving(self) -> Settings:
        if self.http_listen is not None:
            split_host_port(self.http_listen)
            if not self.tls.enabled:
                raise ValueError("http_listen redirects to HTTPS and answers ACME: it needs tls.cert/key or tls.acme")
        if self.tls.acme is not None and self.http_listen is None:
            raise ValueError("tls.acme needs http_listen (the HTTP-01 challenge is answered there, port 80 outside)")
        if self.external_url is not None:
            parts = urlsplit(self.external_url)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/"):
                raise ValueError(f"invalid external_url {self.external_url!r} (expected https://host[:port])")
        return self

    @model_validator(mode="after")
    def _sync_entries(self) -> Settings:
        names = self.sync_names
        repeated = {n for n in names if names.count(n) > 1}
        if repeated:
            raise ValueError(f"sync entry names must be unique, repeated: {', '.join(sorted(repeated))}")
        upstreams = {u.name for u in self.upstreams}
        for image in (image for entry in self.sync for image in entry.images):
            first, _, rest = image.partition("/")
            # Docker's rule, as clients write names: a first component with a dot or a port names a registry.
            if rest and ("." in first or ":" in first or first == "localhost") and first not in upstreams:
                raise ValueError(f"sync image {image!r} names a registry that is not an upstream: {first}")
        return self

    @property
    def sync_names(self) -> list[str]:
        """Each sync entry's name: its own, else its position (1, 2, ...)."""
        return [entry.name or str(i) for i, entry in enumerate(self.sync, 1)]

    @property
    def default(self) -> UpstreamConfig:
        """The upstream for names without a registry host: docker.io unless configured."""
        wanted = self.default_upstream or DOCKER_HUB
        return next((u for u in self.upstreams if u.name == wanted), self.upstreams[0])


def split_host_port(value: str) -> tuple[str, int]:
    """`host:port` (IPv6 in brackets) into its parts; ValueError with a clear word otherwise."""
    match = re.fullmatch(r"\[?([^\[\]]*?)\]?:(\d{1,5})", value.strip())
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ValueError(f"invalid listen address {value!r} (expected host:port)")
    return match.group(1) or "0.0.0.0", int(match.group(2))


def _env_overrides(environ: Mapping[str, str]) -> list[tuple[list[str], Any]]:
    """CARGOHOLD_A__B__0__C=value -> (["a","b","0","c"], yaml-parsed value)."""
    found = []
    for key, raw in sorted(environ.items()):
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG":
            continue
        path = [part.lower() for part in key[len(ENV_PREFIX) :].split("__")]
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        found.append((path, value))
    return found


def _apply(raw: dict[str, Any], path: list[str], value: Any, origin: str) -> None:
    """Set one nested key of the raw config, creating dicts and list items as needed."""
    node: Any = raw
    for depth, part in enumerate(path):
        last = depth == len(path) - 1
        if isinstance(node, list):
            if not part.isdigit():
                raise ConfigError(f"{origin}: {'.'.join(path[:depth])} is a list; expected an index, got {part!r}")
            index = int(part)
            while len(node) <= index:
                node.append({})
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{origin}: {'.'.join(path[:depth])} is not a section")
        if last:
            node[part] = value
        else:
            if part not in node or node[part] is None:
                node[part] = [] if path[depth + 1].isdigit() else {}
            node = node[part]


def _upstreams_as_dicts(raw: dict[str, Any]) -> None:
    """Environment overrides of upstreams need the defaults spelled out to patch them."""
    if "upstreams" not in raw:
        raw["upstreams"] = [u.model_dump(exclude_none=True) for u in _default_upstreams()]


def _format(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "config"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        problems.append(f"{key}: {message}")
    return "; ".join(problems)


def load_settings(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Read the YAML file (optional), apply CARGOHOLD_* variables, then command-line overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys at the top")
        raw = loaded or {}
    env = _env_overrides(os.environ if environ is None else environ)
    if any(p[0] == "upstreams" for p, _ in env):
        _upstreams_as_dicts(raw)
    for key_path, value in env:
        _apply(raw, key_path, value, ENV_PREFIX + "__".join(key_path).upper())
    for key, value in (overrides or {}).items():
        if value is not None:
            raw[key] = value
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format(exc)) from None
