"""Upstream faults, injected by the hub's front: warm content keeps being served, cold requests
fail with a clear OCI error, retries stay bounded, and recovery needs nobody."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from reliability.helpers import cached_blob, get, oci_code, pull_all, temp_files
from rig import images as I
from rig.hub import Fault, Hub
from rig.server import Cargohold
from rig.util import wait_until

FAST_FAILING = {"timeout": "1s", "failure_pause": "1s"}
STORM = 20


@dataclass(frozen=True)
class Case:
    """A way for the upstream to fail, and the answer a cold request gets when it meets it;
    while the upstream is paused after a failure, cold requests get 503 at once instead."""

    name: str
    apply: Callable[[Hub], Fault | None]
    status: int
    code: str = "UNAVAILABLE"
    blobs_fail: bool = True  # False: the fault leaves blobs alone
    # Upstream calls for the cold repository: STORM + 2 client requests, at most one retried fetch
    # (3 attempts) per request let through, most answered by the pause.
    max_upstream_calls: int = 3 * 3

    @property
    def statuses(self) -> set[int]:
        return {self.status, 503}


def _down(services: tuple[str, ...]) -> Callable[[Hub], None]:
    return lambda hub: hub.set_down(True, services)


CASES = [
    Case("connection refused", _down(("registry",)), 503),
    Case("connection reset", lambda hub: hub.inject(reset=True), 503),
    Case("500 on everything", lambda hub: hub.inject(status=500), 503),
    Case("hang", lambda hub: hub.inject(hold=True, hold_timeout=30), 504),
    # Issue 17: the upstream limiting us is passed on as 429 TOOMANYREQUESTS with its Retry-After, not 503.
    Case(
        "429 storm with Retry-After",
        lambda hub: hub.inject(status=429, headers={"Retry-After": "2"}),
        429,
        code="TOOMANYREQUESTS",
    ),
    Case("token service 500", lambda hub: hub.inject(service="token", status=500), 503),
    Case("token service down", _down(("token",)), 503),
    Case("token service hangs", lambda hub: hub.inject(service="token", hold=True, hold_timeout=30), 504),
    Case("token service garbage", lambda hub: hub.inject(service="token", status=200, body=b"<html>oops"), 503),
    Case(
        "garbage manifests",
        lambda hub: hub.inject(path_regex=r"/manifests/", status=200, body=b"\x00not json{"),
        502,
        blobs_fail=False,
        # A 200 with a bad body is the manifest's fault, not the upstream's: no pause, no retry.
        # Concurrent asks of one tag share a fetch, so how many reach upstream depends on timing,
        # at most one per client request.
        max_upstream_calls=STORM + 2,
    ),
]


@contextmanager
def faulty(hub: Hub, case: Case) -> Iterator[None]:
    fault = case.apply(hub)
    try:
        yield
    finally:
        if fault is not None:
            fault.release()  # parked requests go on (and find cargohold gone away)
        hub.reset()


def _storm(srv: Cargohold, path: str) -> list[tuple[int, str]]:
    """STORM clients at once; every one must get an OCI error (never a hang or a traceback)."""
    with ThreadPoolExecutor(STORM) as pool:
        results = list(pool.map(lambda _: get(srv, path), range(STORM)))
    return [(r.status, oci_code(r)) for r in results]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_upstream_fault(
    case: Case, hub: Hub, cargohold: Callable[..., Cargohold], fresh_image: Callable[..., I.Image]
) -> None:
    srv = cargohold(tag_ttl="0s", upstream=FAST_FAILING)
    warm, cold = fresh_image(), fresh_image()
    pull_all(srv, warm)

    with faulty(hub, case):
        # Warm: tags answered stale, digests and blobs from cache, every byte right.
        pull_all(srv, warm)
        pull_all(srv, warm)
        # Cold: a clear OCI error, for one client and for a storm of them.
        res = get(srv, f"/v2/{cold.repo}/manifests/{cold.tag}")
        assert res.status in case.statuses and oci_code(res) == case.code, res.body
        if "429" in case.name:
            assert res.header("Retry-After") in ("1", "2")
        storm = _storm(srv, f"/v2/{cold.repo}/manifests/{cold.tag}")
        assert {code for _, code in storm} <= {case.code, "UNAVAILABLE"}, storm
        assert {status for status, _ in storm} <= case.statuses, storm
        blob = cold.blobs[0]
        res = get(srv, f"/v2/{cold.repo}/blobs/{blob.digest}")
        if case.blobs_fail:
            assert res.status in case.statuses and oci_code(res) in {case.code, "UNAVAILABLE"}, res.body
            assert not cached_blob(srv, blob.digest).exists()
        else:
            assert res.status == 200 and res.body == blob.read_bytes()
        upstream_calls = hub.count(path_regex=rf"^/v2/{cold.repo}/")
        assert upstream_calls <= case.max_upstream_calls, upstream_calls
        assert "Traceback" not in srv.log_text()

    # Recovery by itself once the pause is over: the same requests now succeed and are cached.
    def recovered() -> bool:
        return get(srv, f"/v2/{cold.repo}/manifests/{cold.tag}").status == 200

    wait_until(recovered, timeout=30, interval=0.2, what="cargohold to use the upstream again")
    pull_all(srv, cold)
    assert all(cached_blob(srv, b.digest).is_file() for b in cold.blobs)
    assert temp_files(srv) == []


def test_stale_answers_come_at_once_while_paused(
    hub: Hub, cargohold: Callable[..., Cargohold], fresh_image: Callable[..., I.Image]
) -> None:
    """A hanging upstream costs the first stale answer its retries; the next ones skip upstream."""
    srv = cargohold(tag_ttl="0s", upstream={"timeout": "1s", "failure_pause": "10m"})
    warm = fresh_image()
    pull_all(srv, warm)
    fault = hub.inject(hold=True, hold_timeout=30)
    try:
        pull_all(srv, warm)
        asked = hub.count()
        for _ in range(5):
            pull_all(srv, warm)
        assert hub.count() == asked  # paused: nothing more reached the upstream
        assert srv.log_text().count("serving stale") >= 6
    finally:
        fault.release()


def test_slow_trickle_and_stalled_blob_do_not_hold_up_others(
    hub: Hub, cargohold: Callable[..., Cargohold], fresh_image: Callable[..., I.Image]
) -> None:
    srv = cargohold(upstream=FAST_FAILING | {"timeout": "5s"})
    warm, slow, stalled = fresh_image(), fresh_image(random_bytes=1 << 20), fresh_image(random_bytes=1 << 20)
    pull_all(srv, warm)
    big = max(slow.layers, key=lambda b: b.size)
    stuck = max(stalled.layers, key=lambda b: b.size)
    hub.inject(method="GET", path_regex=big.digest, rate=256 * 1024)
    parked = hub.inject(method="GET", path_regex=stuck.digest, hold_after=stuck.size // 2)
    with ThreadPoolExecutor(2) as pool:
        trickling = pool.submit(get, srv, f"/v2/{slow.repo}/blobs/{big.digest}")
        stalling = pool.submit(get, srv, f"/v2/{stalled.repo}/blobs/{stuck.digest}")
        parked.wait_waiting(1)
        pull_all(srv, warm)  # served while one blob trickles and another is stuck mid-body
        assert not stalling.done()
        res = trickling.result(timeout=120)
        assert res.status == 200 and res.body == big.read_bytes()
        # The stalled upstream connection is given up after `timeout`; its client is cut off.
        with pytest.raises(Exception):  # noqa: B017 - how a cut-off read fails depends on where the cut falls
            stalling.result(timeout=120)
    parked.release()
    assert cached_blob(srv, big.digest).read_bytes() == big.read_bytes()
    assert not cached_blob(srv, stuck.digest).exists()
    hub.clear_faults()
    res = get(srv, f"/v2/{stalled.repo}/blobs/{stuck.digest}")
    assert res.status == 200 and res.body == stuck.read_bytes()
