"""Next-page Links pointed back at this mirror: the client's name and its `?ns=`, with the page query
only. The host, scheme and path an upstream named in its own Link are never passed on (they may be a
host clients must not learn of, and nobody is to follow them)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from aiohttp import web
from yarl import URL

_NEXT = re.compile(r'<([^<>]*)>\s*;\s*rel="?next"?', re.IGNORECASE)


def upstream_next(link: str | None) -> list[tuple[str, str]] | None:
    """The query of an upstream's rel="next" Link; None when it names no next page (or no URL)."""
    found = _NEXT.search(link or "")
    if found is None:
        return None
    try:
        return list(URL(found.group(1)).query.items())
    except ValueError:
        return None


def next_link(request: web.Request, tail: str, query: Iterable[tuple[str, str]]) -> str:
    """A rel="next" Link to `/v2/<the client's name>/<tail>` with `query` and the client's own `?ns=`."""
    pairs = [(key, value) for key, value in query if key != "ns"]
    if "ns" in request.query:
        pairs.append(("ns", request.query["ns"]))
    url = URL.build(path=f"/v2/{request.match_info['name']}/{tail}", query=pairs)
    return f'<{url}>; rel="next"'
