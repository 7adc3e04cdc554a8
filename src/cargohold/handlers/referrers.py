"""GET /v2/<name>/referrers/<digest> (OCI 1.1): the manifests that name a manifest as their subject."""

from __future__ import annotations

from aiohttp import web

from cargohold.errors import BadRequest
from cargohold.handlers.links import next_link, upstream_next
from cargohold.handlers.target import proxy_of, target_of
from cargohold.keys import CACHE
from cargohold.oci.digests import Digest
from cargohold.oci.mediatypes import OCI_INDEX

# Query parameters of ours; the rest is the page query of a Link we gave, passed on to upstream.
OURS = frozenset({"ns", "artifactType"})
MAX_PAGE_PARAMS = 8


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
    following = upstream_next(answer.link)
    if following is not None:
        headers["Link"] = next_link(request, f"referrers/{subject}", following)
    return web.Response(body=answer.body, headers=headers)
