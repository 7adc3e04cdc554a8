"""GET /v2/<name>/tags/list, passed through to the upstream with `n` and `last`.

Some registries (distribution 2.x among them) ignore `n` and `last` and answer every tag in no
order; the spec wants lexical order, at most `n` after `last`, and a Link to the rest. So the page
is cut here too: on a list the upstream already paged this changes nothing.
"""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web

from cargohold.handlers.links import next_link, upstream_next
from cargohold.handlers.target import proxy_of, target_of

# A usable `n`: ASCII digits that int() takes (`"²".isdigit()` is true; int() refuses it, and over 4,300 digits).
_COUNT = re.compile(r"[0-9]{1,9}")
# All a tags/list page query holds (all this mirror passes upstream).
PAGE_QUERY = frozenset({"n", "last"})


def page(body: bytes, n: str | None, last: str | None) -> tuple[bytes, dict[str, str] | None] | None:
    """The tag list `body` cut to the page `n`/`last` asks for, and the query of the next page;
    None when nothing is asked or the body has no list of tags to cut."""
    if n is None and last is None:
        return None
    limit = int(n) if n is not None and _COUNT.fullmatch(n) else None
    data: dict[str, Any] = json.loads(body)
    tags = data.get("tags")
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        return None
    after = sorted(t for t in tags if last is None or t > last)
    kept = after if limit is None else after[:limit]
    following = {"n": str(limit), "last": kept[-1]} if limit and len(after) > len(kept) else None
    return json.dumps({**data, "tags": kept}).encode(), following


async def list_tags(request: web.Request) -> web.Response:
    target = target_of(request)
    n, last = request.query.get("n"), request.query.get("last")
    result = await proxy_of(request).tag_list(target, n, last)
    body, headers = result.body, {}
    upstream_page = upstream_next(result.link)
    if upstream_page is not None:
        headers["Link"] = next_link(request, "tags/list", [(k, v) for k, v in upstream_page if k in PAGE_QUERY])
    cut = page(body, n, last)
    if cut is not None:
        body, following = cut
        if following is not None and "Link" not in headers:
            headers["Link"] = next_link(request, "tags/list", following.items())
    return web.Response(body=body, content_type="application/json", headers=headers)
