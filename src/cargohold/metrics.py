"""Prometheus metrics of one instance, in its own registry (no global state), plus what the
status page and `/ready` show about each upstream.

Counted where things happen: responses when their headers go out (`count_response`), upstream
requests in `UpstreamClient.open` (this object is its observer), evictions by the evictor; sizes
and single-flight joins are read from the live objects at scrape time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cargohold.cache.index import Index, Stored, Usage
from cargohold.proxy import PullThrough
from cargohold.thisloop import ThisLoop
from cargohold.upstream.quota import figure

# With `workers: N`, the directory where every worker's counters live (prometheus_client's multiprocess mode).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def share_across_workers() -> None:
    """In a worker process, before any metric exists: keep counters in files under $PROMETHEUS_MULTIPROC_DIR
    so that one scrape, answered by any worker, adds up all of them."""
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]  # prometheus_client's multiprocess helpers are untyped


def forget_worker(directory: os.PathLike[str], pid: int) -> None:
    """A worker has exited: its gauges leave the sums (its counters stay counted)."""
    multiprocess.mark_process_dead(pid, os.fspath(directory))  # type: ignore[no-untyped-call]  # prometheus_client's multiprocess helpers are untyped


@dataclass(slots=True)
class UpstreamState:
    """The last thing an upstream did, for people (status page) and `/ready`."""

    last_ok: float | None = None
    last_error: float | None = None
    error: str = ""
    ratelimit_remaining: int | None = None
    ratelimit_limit: int | None = None

    @property
    def state(self) -> str:
        if self.last_ok is None and self.last_error is None:
            return "unknown"
        if self.last_error is not None and (self.last_ok is None or self.last_error > self.last_ok):
            return "failing"
        return "ok"


def route_of(request: web.BaseRequest) -> str:
    """The matched route's pattern (`/v2/{name}/manifests/{reference}`), or `unmatched`."""
    info = getattr(request, "match_info", None)
    resource = info.route.resource if info is not None else None
    return resource.canonical if resource is not None else "unmatched"


def kind_of_route(route: str) -> str:
    """What a registry request asks for, for the cache metrics and the access log: `-` for anything else."""
    for part, kind in (("/manifests/", "manifest"), ("/blobs/", "blob"), ("/referrers/", "referrers")):
        if part in route:
            return kind
    return "-"


# Kinds of response whose counters are kept looked up (`Metrics._counts_of`).
MAX_CHILDREN = 1000


@dataclass(slots=True)
class _ResponseCounts:
    """The labelled counters one kind of response adds to: requests, the cache outcome (manifest, blob and
    referrers GETs), and served bytes with the name of their lasting counter (a 200 or 206 of those)."""

    request: Counter
    cache: Counter | None = None
    source: tuple[Counter, str] | None = None


class Metrics:
    """Everything `/metrics` exports. `ratelimit_rejections` is for the rate-limit middleware to `.inc()`."""

    def __init__(self, upstreams: list[str], max_size: int | None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "cargohold_http_requests",
            "Responses by route, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.cache = Counter(
            "cargohold_cache_requests",
            "GET of manifests, blobs and referrers by kind and cache outcome (hit, miss, stale)",
            ["kind", "result"],
            registry=r,
        )
        self.served_bytes = Counter(
            "cargohold_served_bytes",
            "Body bytes of manifest and blob GETs, by source (cache or upstream)",
            ["source"],
            registry=r,
        )
        self.upstream_requests = Counter(
            "cargohold_upstream_requests",
            "Requests sent upstream by status",
            ["upstream", "method", "status"],
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "cargohold_upstream_request_seconds",
            "Time to an upstream answer's headers",
            ["upstream", "method"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "cargohold_upstream_errors",
            "Upstream failures (timeout, connection, 5xx, 429)",
            ["upstream", "kind"],
            registry=r,
        )
        self.upstream_bytes = Counter(
            "cargohold_upstream_bytes", "Body bytes announced by successful upstream GETs", ["upstream"], registry=r
        )
        self.ratelimit_remaining = Gauge(
            "cargohold_upstream_ratelimit_remaining",
            "Docker Hub pulls left, from the last ratelimit-remaining header",
            ["upstream"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.content = Counter(
            "cargohold_content_requests",
            "Manifests by digest and blobs asked of each source (the upstream or a content mirror), by outcome",
            ["upstream", "source", "kind", "outcome"],
            registry=r,
        )
        self.content_bytes = Counter(
            "cargohold_content_bytes",
            "Body bytes announced by each source (the upstream or a content mirror) for what it served",
            ["upstream", "source", "kind"],
            registry=r,
        )
        self.ratelimit_rejections = Counter(
            "cargohold_ratelimit_rejections", "Client requests refused by cargohold's own rate limit", registry=r
        )
        self.evictions = Counter("cargohold_cache_evictions", "Entries evicted from the cache", ["kind"], registry=r)
        self.evicted_bytes = Counter("cargohold_cache_evicted_bytes", "Bytes evicted from the cache", registry=r)
        self.pinned_bytes = Gauge(
            "cargohold_cache_pinned_bytes",
            "Bytes of pinned images in the cache, as of the last eviction run (more than max_size: pins overflow)",
            registry=r,
            multiprocess_mode="mostrecent",  # with workers, the leader's eviction run sets it
        )
        self.max_size = max_size
        self.upstreams = {name: UpstreamState() for name in upstreams}
        self.index: Index | None = None
        self.usage = Usage(0, 0, 0, 0)
        self.started = time.time()
        self._shared_dir = os.environ.get(MULTIPROC_ENV)
        self._own: list[Collector] = []  # collectors of live objects, registered here and in a workers' scrape
        self._counts: dict[tuple[str, str, int, str], _ResponseCounts] = {}
        # Responses of this loop iteration not counted yet: (route, method, status, outcome) -> [responses, bytes].
        self._pending: dict[tuple[str, str, int, str], list[int]] = {}
        self._loop = ThisLoop()

    def attach(self, index: Index, proxy: PullThrough) -> None:
        """Read cache size and single-flight figures from the live objects at every scrape."""
        self.index = index
        self.register_own(_Live(self, proxy))

    def register_own(self, collector: Collector) -> None:
        """A collector that reads this process's live objects at scrape time."""
        self._own.append(collector)
        self.registry.register(collector)

    async def refresh(self) -> None:
        """Count what waits, and read the cache's size from the index (before a scrape or a status page)."""
        self.count_pending()
        if self.index is not None:
            self.usage = await self.index.usage()

    def _lasting(self, name: str, value: float) -> None:
        """Also add to the index's counters (hit, miss, stale, bytes_cache, bytes_upstream), which survive restarts."""
        if self.index is not None:
            self.index.add_count(name, value)

    # responses

    def response(self, request: web.BaseRequest, response: web.StreamResponse, outcome: str) -> None:
        """Count a response at the end of this event-loop iteration, with the others of the iteration: a
        counter's `inc` takes a lock (and, with workers, writes a shared file) each time."""
        key = (route_of(request), request.method, response.status, outcome)
        served = response.content_length or 0
        pending = self._pending.get(key)
        if pending is None:
            if not self._pending:
                loop = self._loop.get()
                if loop is None:
                    self._count(key, 1, served)
                    return
                loop.call_soon(self.count_pending)
            self._pending[key] = [1, served]
        else:
            pending[0] += 1
            pending[1] += served

    def count_pending(self) -> None:
        """Add the responses counted since to the counters (also before a scrape reads them)."""
        pending, self._pending = self._pending, {}
        for key, (responses, served) in pending.items():
            self._count(key, responses, served)

    def _count(self, key: tuple[str, str, int, str], responses: int, served: int) -> None:
        counts = self._counts.get(key) or self._counts_of(*key)
        counts.request.inc(responses)
        if counts.cache is None:
            return
        counts.cache.inc(responses)
        self._lasting(key[3], responses)
        if counts.source is not None and served:
            counts.source[0].inc(served)
            self._lasting(counts.source[1], served)

    def _counts_of(self, route: str, method: str, status: int, outcome: str) -> _ResponseCounts:
        """The counters a response of this kind adds to, looked up once (labels() takes a lock and builds a
        tuple). Only the first MAX_CHILDREN kinds are kept (a client chooses the method)."""
        counts = _ResponseCounts(self.requests.labels(route, method, str(status)))
        kind = kind_of_route(route)
        if kind != "-" and method == "GET" and outcome in ("hit", "miss", "stale"):
            counts.cache = self.cache.labels(kind, outcome)
            if status in (200, 206):
                source = "upstream" if outcome == "miss" else "cache"
                counts.source = (self.served_bytes.labels(source), "bytes_" + source)
        if len(self._counts) < MAX_CHILDREN:
            self._counts[(route, method, status, outcome)] = counts
        return counts

    # the UpstreamClient observer

    def upstream_answered(self, upstream: str, method: str, response: aiohttp.ClientResponse, seconds: float) -> None:
        status = response.status
        self.upstream_requests.labels(upstream, method, str(status)).inc()
        self.upstream_seconds.labels(upstream, method).observe(seconds)
        state = self.upstreams.setdefault(upstream, UpstreamState())
        if status >= 500 or status == 429:
            self.upstream_failed(upstream, method, "429" if status == 429 else "5xx", seconds, counted=True)
        else:
            state.last_ok = time.time()
        if method == "GET" and status in (200, 206) and response.content_length:
            self.upstream_bytes.labels(upstream).inc(response.content_length)
        remaining = figure(response.headers.get("RateLimit-Remaining"))
        if remaining is not None:
            state.ratelimit_remaining = remaining[0]
            self.ratelimit_remaining.labels(upstream).set(state.ratelimit_remaining)
            limit = figure(response.headers.get("RateLimit-Limit"))
            state.ratelimit_limit = limit[0] if limit is not None else None

    def upstream_failed(self, upstream: str, method: str, kind: str, seconds: float, *, counted: bool = False) -> None:
        if not counted:
            self.upstream_requests.labels(upstream, method, kind).inc()
            self.upstream_seconds.labels(upstream, method).observe(seconds)
        self.upstream_errors.labels(upstream, kind).inc()
        state = self.upstreams.setdefault(upstream, UpstreamState())
        state.last_error, state.error = time.time(), kind

    def content_fetched(self, upstream: str, source: str, kind: str, outcome: str, size: int) -> None:
        self.content.labels(upstream, source, kind, outcome).inc()
        if outcome == "served":
            self.content_bytes.labels(upstream, source, kind).inc(size)

    # the evictor

    def evicted(self, entry: Stored) -> None:
        self.evictions.labels(entry.table.rstrip("s")).inc()
        self.evicted_bytes.inc(entry.size)

    def exposition(self) -> bytes:
        """This process's metrics; with workers, every worker's counters summed, and this one's live figures."""
        if self._shared_dir is None:
            return generate_latest(self.registry)
        machine = CollectorRegistry()
        multiprocess.MultiProcessCollector(machine, self._shared_dir)  # type: ignore[no-untyped-call]  # prometheus_client's multiprocess helpers are untyped
        for collector in self._own:  # read from this process's objects, not summed across workers
            machine.register(collector)
        return generate_latest(machine)


class _Live:
    """A collector for figures read from live objects: cache size (as of the last refresh), joins."""

    def __init__(self, metrics: Metrics, proxy: PullThrough) -> None:
        self._metrics = metrics
        self._proxy = proxy

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        usage = self._metrics.usage
        yield GaugeMetricFamily(
            "cargohold_cache_size_bytes", "Bytes of manifests and blobs in the cache", value=usage.size
        )
        entries = GaugeMetricFamily("cargohold_cache_entries", "Entries in the cache index", labels=["kind"])
        for kind, count in (("blob", usage.blobs), ("manifest", usage.manifests), ("tag", usage.tags)):
            entries.add_metric([kind], count)
        yield entries
        if self._metrics.max_size is not None:
            yield GaugeMetricFamily(
                "cargohold_cache_max_size_bytes", "The configured cache.max_size", value=self._metrics.max_size
            )
        downloads = self._proxy.downloads
        yield GaugeMetricFamily(
            "cargohold_downloads_in_flight", "Blob downloads running now", value=downloads.in_flight
        )
        joins = CounterMetricFamily(
            "cargohold_singleflight_joins", "Requests that joined a fetch already running", labels=["kind"]
        )
        joins.add_metric(["blob"], downloads.joins)
        joins.add_metric(["manifest"], self._proxy.joins)
        yield joins
        yield CounterMetricFamily(
            "cargohold_downloads_uncached",
            "Blob downloads streamed without caching (disk full)",
            value=downloads.uncached,
        )
        if self._proxy.peers is not None:
            waits = CounterMetricFamily(
                "cargohold_peer_waits",
                "Blob misses that waited for another replica's download, by outcome",
                labels=["outcome"],
            )
            for outcome in ("landed", "took_over", "timed_out", "followed"):
                waits.add_metric([outcome], self._proxy.peers.waits[outcome])
            yield waits
        pauses = CounterMetricFamily(
            "cargohold_upstream_pauses", "Times an upstream was paused after a failure or a 429", labels=["upstream"]
        )
        for upstream in self._proxy.router.upstreams:
            pauses.add_metric([upstream.name], upstream.breaker.trips)
        yield pauses
        yield from _quota_metrics(self._proxy)


def _quota_metrics(proxy: PullThrough) -> Iterator[Metric]:
    """Pulls cargohold spent per upstream account (manifest GETs its quota counts), the quota's limit and reserve."""
    pulls = CounterMetricFamily(
        "cargohold_upstream_pulls",
        "Manifest GETs answered by an upstream (pulls its quota counts), per account",
        labels=["upstream", "account"],
    )
    limits = GaugeMetricFamily(
        "cargohold_upstream_ratelimit_limit", "The upstream's pull limit, from ratelimit-limit", labels=["upstream"]
    )
    reserves = GaugeMetricFamily(
        "cargohold_upstream_quota_reserve", "Pulls kept for waiting clients (quota_reserve)", labels=["upstream"]
    )
    for upstream in proxy.router.upstreams:
        quota = upstream.quota
        pulls.add_metric([upstream.name, quota.account], quota.total)
        if quota.limit is not None:
            limits.add_metric([upstream.name], quota.limit)
        if quota.reserve is not None:
            reserves.add_metric([upstream.name], quota.reserve)
    yield from (pulls, limits, reserves)
