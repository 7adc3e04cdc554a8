"""The auth resources' lifetime on the app: opened at start, the htpasswd file watched while running."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from cargohold.auth.service import Auth
from cargohold.keys import AUTH, SETTINGS, TASKS

log = logging.getLogger("cargohold.auth")

RELOAD_INTERVAL = 1.0  # how soon an edit of the htpasswd file (a removed user) takes effect


async def auth_context(app: web.Application) -> AsyncIterator[None]:
    auth = app[AUTH] = Auth.open(app[SETTINGS], app[TASKS])
    app[TASKS].spawn(_watch(auth), "htpasswd reload")
    yield


async def _watch(auth: Auth) -> None:
    while True:
        await asyncio.sleep(RELOAD_INTERVAL)
        try:
            if auth.users.refresh():
                auth.admitted.clear()  # a removed user or a changed password counts at once
        except Exception:
            log.exception("could not reload the htpasswd file %s", auth.users.path)
