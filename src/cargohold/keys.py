"""Typed application keys: everything an app instance owns lives on it, nothing at module level."""

from __future__ import annotations

from aiohttp import web

from cargohold.config import Settings
from cargohold.proxy import PullThrough

SETTINGS = web.AppKey("settings", Settings)
PROXY = web.AppKey("proxy", PullThrough)
