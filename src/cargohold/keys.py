"""Typed application keys: everything an app instance owns lives on it, nothing at module level."""

from __future__ import annotations

from aiohttp import web

from cargohold.config import Settings
from cargohold.proxy import PullThrough
from cargohold.ratelimit.limiter import RateLimiter
from cargohold.upstream.routes import Target

SETTINGS = web.AppKey("settings", Settings)
PROXY = web.AppKey("proxy", PullThrough)
RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)

# Per request: its id, how the cache answered (hit/miss/stale, for the access log), its target.
REQUEST_ID = web.RequestKey("request_id", str)
CACHE = web.RequestKey("cache", str)
TARGET = web.RequestKey("target", Target)
