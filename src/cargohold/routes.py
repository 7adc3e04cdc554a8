"""The one route table."""

from __future__ import annotations

from aiohttp import web

from cargohold.handlers.blobs import get_blob
from cargohold.handlers.manifests import get_manifest
from cargohold.handlers.meta import api_version, health, unsupported
from cargohold.handlers.metrics import METRICS_PATH, metrics_endpoint
from cargohold.handlers.referrers import get_referrers
from cargohold.handlers.status import ready, status_page
from cargohold.handlers.tags import list_tags
from cargohold.handlers.token import issue_oauth_token, issue_token

NAME = r"{name:[^{}]+?}"


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/health", health)
    r.add_get("/token", issue_token)
    r.add_post("/token", issue_oauth_token)
    r.add_get("/ready", ready)
    r.add_get(METRICS_PATH, metrics_endpoint)
    r.add_get("/", status_page)
    r.add_get("/v2/", api_version)
    r.add_get("/v2", api_version)
    r.add_route("*", "/v2/" + NAME + "/blobs/uploads/{rest:.*}", unsupported)
    r.add_get("/v2/" + NAME + "/manifests/{reference}", get_manifest)
    r.add_route("PUT", "/v2/" + NAME + "/manifests/{reference}", unsupported)
    r.add_route("DELETE", "/v2/" + NAME + "/manifests/{reference}", unsupported)
    r.add_get("/v2/" + NAME + "/blobs/{digest}", get_blob)
    r.add_route("DELETE", "/v2/" + NAME + "/blobs/{digest}", unsupported)
    r.add_get("/v2/" + NAME + "/tags/list", list_tags)
    # `subject`, not `digest`: counted like a manifest by digest, not against the blob budget.
    r.add_get("/v2/" + NAME + "/referrers/{subject}", get_referrers)
