"""GET /v2/<name>/referrers/<digest> (OCI 1.1): the manifests that name a manifest as their subject."""

from __future__ import annotations

import re

from aiohttp import web
from yarl import URL

from cargohold.errors import BadRequest
from cargohold.handlers.target import proxy_of, target_of
from cargohold.keys import CACHE
from cargohold.oci.digests import Digest
from cargohold.oci.mediatypes import OCI_INDEX

# Query parameters of ours; the rest is the page query of a Link we gave, passed on to upstream.
OURS = frozenset({"ns", "artifactType"})
MAX_PAGE_PARAMS = 8

_NEXT = re.compile(r'<([^<>]*)>\s*;\s*rel="?next"?', re.IGNORECASE)


def next_page(link: str | None, request: web.Request, subject: str) -> str | None:
    """Upstream's next-page Link pointed back at us: the client's name (path prefix included) and its `?ns=`,
    upstream's page query kept; whatever host or path upstream named is not followed by anyone."""
    found = _NEXT.search(link or "")
    if found is None:
        return None
    query = [(k, v) for k, v in URL(found.group(1)).query.items() if k != "ns"]
    if "ns" in request.query:
        query.append(("ns", request.query["ns"]))
    url = URL.build(path=f"/v2/{request.match_info['name']}/referrers/{subject}", query=query)
    return f'<{url}>; rel="next"'


async def get_referrers(request: web.Request) -> web.Response:
    target = target_of(request)
    subject = request.match_info["subject"]
    digest = Digest.parse(subject)
    artifact_type = request.query.get("artifactType") or None
    page = {k: v for k, v in request.query.items() if k not in OURS}
    if len(page) > MAX_PAGE_PARAMS:
        raise BadRequest("too many query parameters", {"limit": MAX_PAGE_PARAMS})
    answer = await proxy_of(request).referrers_of(target, digest, artifact_type, page)
    request[CACHE] = answer.cache
    headers = {"Content-Type": OCI_INDEX}
    if answer.filtered:
        headers["OCI-Filters-Applied"] = "artifactType"
    link = next_page(answer.link, request, subject)
    if link is not None:
        headers["Link"] = link
    return web.Response(body=answer.body, headers=headers)
