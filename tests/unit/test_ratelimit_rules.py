"""Rate limiting: which budget applies to whom, how requests are classified and counted, 429s."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from cargohold.app import build_app
from cargohold.config import BudgetOverrides, ConfigError, Settings, UpstreamConfig, load_settings
from cargohold.errors import TooManyRequests
from cargohold.identity import Identity
from cargohold.ratelimit.budgets import PRESETS, Budget, budget_for
from cargohold.ratelimit.connections import QUEUE, Connections
from cargohold.ratelimit.limiter import Kind, RateLimiter, bucket
from cargohold.ratelimit.memory import MovingWindowMemory
from cargohold.upstream.client import UpstreamClient

ALICE = Identity(ipaddress.ip_address("10.0.0.1"), "alice", frozenset({"ci", "dev"}))
ANON = Identity(ipaddress.ip_address("10.0.0.2"))


async def count(limiter: RateLimiter, identity: Identity, kind: Kind) -> TooManyRequests | None:
    return await limiter.check(identity.key, limiter.items(identity), kind)


def rate_limit(**config: Any) -> Settings:
    return load_settings(None, environ={}, overrides={"rate_limit": config})


def test_default_preset_is_team_and_top_level_overrides_budgets() -> None:
    config = rate_limit().rate_limit
    assert config.preset == "team" and config.storage == "memory://" and config.upstream_fetches == 64
    assert budget_for(config, None, frozenset()) == PRESETS["team"]
    config = rate_limit(preset="personal", burst=30, pulls_per_hour=0).rate_limit
    got = budget_for(config, None, frozenset())
    assert (got.requests_per_second, got.burst, got.connections, got.pulls_per_hour) == (10, 30, 10, 0)


def test_presets_match_the_replaced_stacks_advice() -> None:
    shape = {name: (b.requests_per_second, b.burst, b.connections) for name, b in PRESETS.items()}
    assert shape == {"off": (0, 0, 0), "personal": (10, 20, 10), "team": (20, 50, 20), "medium": (50, 100, 50)}
    assert PRESETS["off"].unlimited and not PRESETS["personal"].unlimited


def test_user_beats_groups_and_groups_give_their_most_generous_budget() -> None:
    config = rate_limit(
        preset="personal",
        groups={"ci": {"preset": "medium", "connections": 5}, "dev": {"pulls_per_minute": 0}, "other": {"burst": 999}},
        users={"alice": {"burst": 7}, "bob": {"preset": "off"}},
    ).rate_limit
    alice = budget_for(config, "alice", frozenset({"ci", "dev"}))
    assert alice.burst == 7  # her own override
    assert alice.requests_per_second == 50  # ci's medium beats dev's personal
    assert alice.connections == 10  # dev's (personal) 10 beats ci's 5
    assert alice.pulls_per_minute == 0  # dev: unlimited beats any number
    assert budget_for(config, "bob", frozenset()).unlimited
    assert budget_for(config, "carol", frozenset({"nope"})) == PRESETS["personal"]


def test_bad_values_name_their_key() -> None:
    with pytest.raises(ConfigError, match=r"rate_limit\.preset"):
        rate_limit(preset="huge")
    with pytest.raises(ConfigError, match=r"rate_limit\.users\.alice\.burst"):
        rate_limit(users={"alice": {"burst": -1}})
    with pytest.raises(ConfigError, match=r"rate_limit\.storage"):
        rate_limit(storage="memcached://x")
    with pytest.raises(ConfigError, match=r"rate_limit\.groups\.ci\.bogus: unknown key"):
        rate_limit(groups={"ci": {"bogus": 1}})
    env = {"CARGOHOLD_RATE_LIMIT__PRESET": "medium", "CARGOHOLD_RATE_LIMIT__STORAGE": "redis://127.0.0.1:6379/2"}
    config = load_settings(None, environ=env).rate_limit
    assert config.preset == "medium" and config.storage == "redis://127.0.0.1:6379/2"


def test_bucket_keeps_the_rate_and_at_least_the_burst() -> None:
    assert bucket(0, 10) is None
    for rate, burst, amount, window in [
        (10, 20, 20, 2),
        (20, 50, 60, 3),
        (50, 100, 100, 2),
        (5, 0, 5, 1),
        (2, 1, 2, 1),
    ]:
        item = bucket(rate, burst)
        assert item is not None and (item.amount, item.get_expiry()) == (amount, window)


async def test_identities_are_counted_apart_and_refusals_say_when_to_retry() -> None:
    config = rate_limit(preset="off", requests_per_second=1, burst=3, pulls_per_minute=1).rate_limit
    limiter = RateLimiter(config, MovingWindowMemory())
    assert limiter.enabled
    assert [await count(limiter, ANON, Kind.REQUEST) for _ in range(3)] == [None, None, None]
    refused = await count(limiter, ANON, Kind.REQUEST)
    assert refused is not None and refused.status == 429 and refused.code == "TOOMANYREQUESTS"
    assert 1 <= int(refused.headers["Retry-After"]) <= 3
    assert refused.headers["RateLimit-Limit"] == "3;w=3" and refused.headers["RateLimit-Remaining"] == "0;w=3"
    assert await count(limiter, ALICE, Kind.REQUEST) is None  # another identity, its own budget
    assert await count(limiter, ANON, Kind.BLOB) is None  # blobs have their own (here unlimited) budget
    assert await count(limiter, ALICE, Kind.PULL) is None
    pulls = await count(limiter, ALICE, Kind.PULL)
    assert pulls is not None and pulls.detail["budget"] == "pulls" and 1 <= pulls.detail["retry_after"] <= 60


async def test_memory_windows_move_and_empty_keys_are_swept(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr("cargohold.ratelimit.memory.time.time", lambda: clock[0])
    storage = MovingWindowMemory()
    assert [await storage.acquire_entry("a", 2, 10) for _ in range(3)] == [True, True, False]
    clock[0] += 4
    assert await storage.acquire_entry("b", 1, 1)
    assert await storage.get_moving_window("a", 2, 10) == (1000.0, 2)  # reset at 1010
    clock[0] += 6.5  # a's two hits have left the window, b's long ago
    assert await storage.acquire_entry("a", 2, 10)
    assert await storage.get_moving_window("a", 2, 10) == (1010.5, 1)
    clock[0] += 11  # past the sweep interval: both windows are empty and get dropped
    await storage.acquire_entry("c", 1, 1)
    assert set(storage._windows) == {"c"}  # noqa: SLF001 - the sweep shows only in the storage's own state


def test_preset_off_disables_the_middleware() -> None:
    assert not RateLimiter(rate_limit(preset="off").rate_limit, MovingWindowMemory()).enabled
    assert RateLimiter(rate_limit(preset="off", users={"a": {"burst": 1}}).rate_limit, MovingWindowMemory()).enabled


async def test_connections_wait_for_a_slot_and_refuse_past_the_queue() -> None:
    slots = Connections(wait=5, queue=1)
    assert await slots.acquire("k", 2) and await slots.acquire("k", 2)
    waiting = [asyncio.create_task(slots.acquire("k", 2)) for _ in range(2)]
    await asyncio.sleep(0)
    assert slots.active("k") == 4 and not any(t.done() for t in waiting)
    assert not await slots.acquire("k", 2)  # two running, two waiting: no more
    slots.release("k")
    assert await waiting[0]
    for _ in range(2):
        slots.release("k")
    assert await waiting[1]
    slots.release("k")
    assert slots.active("k") == 0
    short = Connections(wait=0.01)
    assert await short.acquire("k", 1)
    assert not await short.acquire("k", 1)  # waited too long
    short.release("k")
    assert short.active("k") == 0


async def test_connections_let_a_herd_wait_and_refuse_a_flood() -> None:
    """20 clients x 3 blobs from one address on team's 20 slots all wait (two slots' worth used to be
    refused); a flood past QUEUE waiters per slot is refused at once."""
    slots = Connections(wait=5)
    herd = [asyncio.create_task(slots.acquire("nat", 20)) for _ in range(60)]
    await asyncio.sleep(0)
    assert slots.active("nat") == 60 and all(t.done() for t in herd[:20]) and not any(t.done() for t in herd[20:])
    for _ in range(60):
        slots.release("nat")
        await asyncio.sleep(0)
    assert all(t.result() for t in herd) and slots.active("nat") == 0
    flood = [asyncio.create_task(slots.acquire("flood", 2)) for _ in range(2 * (1 + QUEUE) + 5)]
    await asyncio.sleep(0)
    refused = [t for t in flood if t.done() and not t.result()]
    assert len(refused) == 5 and slots.active("flood") == 2 * (1 + QUEUE)
    for t in flood:
        t.cancel()
    await asyncio.gather(*flood, return_exceptions=True)


async def test_middleware_limits_everything_but_health(tmp_path: Path) -> None:
    settings = Settings.model_validate(
        {
            "data_dir": str(tmp_path),
            "upstreams": [{"name": "docker.io", "url": "http://127.0.0.1:9"}],
            "rate_limit": {"preset": "off", "requests_per_second": 1, "burst": 2},
        }
    )
    async with TestClient(TestServer(build_app(settings))) as client:
        assert [(await client.get("/v2/")).status for _ in range(2)] == [200, 200]
        over = await client.get("/v2/")
        assert over.status == 429 and over.content_type == "application/json"
        assert json.loads(await over.read())["errors"][0]["code"] == "TOOMANYREQUESTS"
        assert int(over.headers["Retry-After"]) in (1, 2) and over.headers["RateLimit-Limit"] == "2;w=2"
        assert (await client.get("/v2/nope/blobs/uploads/")).status == 429  # push attempts count too
        assert [(await client.get("/health")).status for _ in range(5)] == [200] * 5


def test_every_budget_can_be_overridden() -> None:
    assert set(Budget.__dataclass_fields__) == set(BudgetOverrides.model_fields) - {"preset"}


async def test_upstream_gate_caps_requests_waiting_for_an_answer() -> None:
    arrived, answer, first = [], asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        arrived.append(request.path)
        first.set()
        await answer.wait()
        return web.Response(text="ok")

    upstream = web.Application()
    upstream.router.add_get("/v2/{tail:.*}", slow)
    async with TestServer(upstream) as server, aiohttp.ClientSession() as session:
        config = UpstreamConfig(name="docker.io", url=str(server.make_url("")))
        client = UpstreamClient(config, session, gate=asyncio.Semaphore(1))
        opening = [asyncio.create_task(client.open("GET", "r", f"/v2/r/manifests/{i}")) for i in range(2)]
        await first.wait()
        await asyncio.sleep(0.2)  # time enough for the second request, were it not held back
        assert len(arrived) == 1
        answer.set()
        for task in opening:
            (await task).release()
        assert sorted(arrived) == ["/v2/r/manifests/0", "/v2/r/manifests/1"]
