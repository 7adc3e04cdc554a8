"""Which event loop serves: asyncio's, or uvloop's where it measurably helps.

Measured (docs/performance.md, issue 15): uvloop's TLS transport serves warm manifests over HTTPS with about
a sixth less CPU per request than asyncio's; over plain HTTP the two are within noise. So `loop: auto` (the
default) runs uvloop when cargohold serves HTTPS and uvloop is installed (it is a dependency), asyncio
otherwise; `loop: asyncio` or `loop: uvloop` choose.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable

from cargohold.config import Settings

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


class LoopUnavailable(Exception):
    """`loop: uvloop` without uvloop installed."""


def loop_name(settings: Settings) -> str:
    """The loop `settings` ask for, `auto` resolved."""
    if settings.loop != "auto":
        return settings.loop
    return "uvloop" if settings.tls.enabled and _uvloop() is not None else "asyncio"


def loop_factory(settings: Settings) -> LoopFactory | None:
    """What makes the serving loop (None: asyncio's own); LoopUnavailable when uvloop is asked for and missing."""
    if loop_name(settings) == "asyncio":
        return None
    factory = _uvloop()
    if factory is None:
        raise LoopUnavailable("loop: uvloop, but uvloop is not installed (pip install uvloop)")
    return factory


def _uvloop() -> LoopFactory | None:
    try:
        module = importlib.import_module("uvloop")
    except ImportError:
        return None
    factory: LoopFactory = module.new_event_loop
    return factory
