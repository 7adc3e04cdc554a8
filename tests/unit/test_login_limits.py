"""Failed-login windows and the bounded expiring caches, on a clock the test moves."""

from __future__ import annotations

from cargohold.auth.expiring import Expiring
from cargohold.auth.throttle import LoginThrottle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_throttle_blocks_after_limit_until_the_window_ends() -> None:
    clock = Clock()
    throttle = LoginThrottle(limit=3, window=60, clock=clock)
    keys = ("user:alice", "ip:192.0.2.1")
    for _ in range(2):
        throttle.failed(keys)
    assert throttle.retry_after(keys) == 0
    clock.now += 10
    throttle.failed(keys)
    assert throttle.retry_after(keys) == 50
    assert throttle.retry_after(["user:alice"]) == 50 and throttle.retry_after(["ip:198.51.100.1"]) == 0
    clock.now += 49.5
    assert throttle.retry_after(keys) == 1
    clock.now += 1
    assert throttle.retry_after(keys) == 0
    throttle.failed(keys)  # a new window starts
    assert throttle.retry_after(keys) == 0


def test_the_table_is_bounded_in_entries_and_age() -> None:
    """Issue 21.6: the table was swept only when 100,000 entries were reached, and grew past that."""
    clock = Clock()
    throttle = LoginThrottle(limit=3, window=60, clock=clock, max_tracked=100)
    for i in range(1000):
        throttle.failed([f"ip:198.51.{i // 256}.{i % 256}"])
    assert len(throttle) == 100  # the oldest made room
    assert throttle.retry_after(["ip:198.51.3.231"]) == 0
    for _ in range(2):
        throttle.failed(["ip:198.51.3.231"])  # the newest keeps counting
    assert throttle.retry_after(["ip:198.51.3.231"]) == 60
    clock.now += 61
    throttle.failed(["ip:192.0.2.1"])  # a window later the lapsed ones are swept
    assert len(throttle) == 1


def test_success_clears_the_user_but_not_the_address() -> None:
    throttle = LoginThrottle(limit=2, window=60, clock=Clock())
    keys = ("user:alice", "ip:192.0.2.1")
    throttle.failed(keys)
    throttle.succeeded("user:alice")
    throttle.failed(keys)
    assert throttle.retry_after(["user:alice"]) == 0 and throttle.retry_after(["ip:192.0.2.1"]) == 60


def test_expiring_entries_lapse_and_the_map_stays_bounded() -> None:
    clock = Clock()
    cache: Expiring[str, int] = Expiring(limit=3, clock=clock)
    cache.put("a", 1, clock.now + 10)
    cache.put("b", 2, clock.now + 100)
    assert cache.get("a") == 1 and cache.get("x") is None
    clock.now += 10
    assert cache.get("a") is None and cache.get("b") == 2
    cache.put("c", 3, clock.now + 1)
    cache.put("d", 4, clock.now + 100)
    clock.now += 5
    cache.put("e", 5, clock.now + 100)  # full: the lapsed "c" is swept to make room
    assert [cache.get(k) for k in "bcde"] == [2, None, 4, 5]
    cache.put("f", 6, clock.now + 100)  # full of live entries: start over rather than grow
    assert [cache.get(k) for k in "bdef"] == [None, None, None, 6]
