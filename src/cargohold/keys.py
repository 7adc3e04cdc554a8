"""Typed application keys: everything an app instance owns lives on it, nothing at module level."""

from __future__ import annotations

from aiohttp import web

from cargohold.auth.service import Auth
from cargohold.config import Settings
from cargohold.logs import RequestIds
from cargohold.metrics import Metrics
from cargohold.proxy import PullThrough
from cargohold.ratelimit.limiter import RateLimiter
from cargohold.sync.schedule import Scheduler
from cargohold.tasks import Tasks
from cargohold.upstream.routing import Target

SETTINGS = web.AppKey("settings", Settings)
PROXY = web.AppKey("proxy", PullThrough)
AUTH = web.AppKey("auth", Auth)  # only when `auth` is configured
METRICS = web.AppKey("metrics", Metrics)
RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)
SYNC = web.AppKey("sync", Scheduler)  # the sync entries (none configured: none)
REQUEST_IDS = web.AppKey("request_ids", RequestIds)
TASKS = web.AppKey("tasks", Tasks)  # every background task of the app: cancelled and awaited at shutdown

# Per request: its id, how the cache answered (hit/miss/stale, for the access log), its target.
REQUEST_ID = web.RequestKey("request_id", str)
CACHE = web.RequestKey("cache", str)
KIND = web.RequestKey("kind", str)  # manifest, blob, referrers or -: for the access log
TARGET = web.RequestKey("target", Target)

# The plain-HTTP listener (http_listen): pending ACME HTTP-01 answers and where HTTPS listens.
ACME_CHALLENGES = web.AppKey("acme_challenges", dict[str, str])
HTTPS_PORT = web.AppKey("https_port", int)
