"""Secrets never reach the log: upstream credentials, the Basic header made from them, and the
tokens the upstream issues, even at debug level and when requests fail."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable

from reliability.helpers import get, pull_all
from rig.hub import Hub
from rig.images import Image
from rig.server import Cargohold


def test_upstream_credentials_and_tokens_are_not_logged(
    hub: Hub, cargohold: Callable[..., Cargohold], hub_images: dict[str, Image]
) -> None:
    user, password = next(iter(hub.users.items()))
    srv = cargohold(log_level="debug", upstream={"username": user, "password": password, "failure_pause": "0s"})
    pull_all(srv, hub_images["private"])  # needs the credentials: the token dance ran with them
    assert hub.count(service="token") >= 1 and all(r.user == user for r in hub.token_requests)
    hub.inject(service="token", status=500)
    hub.inject(status=401, headers={"WWW-Authenticate": f'Bearer realm="{hub.token_url}",service="x"'})
    res = get(srv, "/v2/acme/never-seen/manifests/latest")
    assert res.status >= 400
    log = srv.log_text()
    basic = base64.b64encode(f"{user}:{password}".encode()).decode()
    assert password not in log and basic not in log
    assert not re.search(r"eyJ[A-Za-z0-9_-]{10,}\.", log), "a JWT reached the log"
