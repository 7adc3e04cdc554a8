"""The upstream pause: fails fast with Retry-After while it lasts, honours Retry-After, and the
settings that drive it and the client timeouts."""

from __future__ import annotations

import pytest

from cargohold.config import ConfigError, Settings, load_settings
from cargohold.errors import UpstreamUnavailable
from cargohold.upstream.breaker import MAX_PAUSE, Breaker, retry_after_seconds


def test_pause_fails_fast_with_retry_after_then_lets_requests_through() -> None:
    breaker = Breaker("docker.io", pause=30)
    breaker.check()  # not paused: nothing happens
    breaker.trip("upstream timed out")
    with pytest.raises(UpstreamUnavailable) as caught:
        breaker.check()
    assert caught.value.headers["Retry-After"] == "30" and caught.value.status == 503
    breaker.trip("429", seconds=1e9)
    assert breaker.remaining() == pytest.approx(MAX_PAUSE, abs=1)
    assert Breaker("x", pause=0).remaining() == 0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("7", 7.0), ("0", 0.0), ("1.5", 1.5), (None, None), ("soon", None), ("-3", None), ("nan", None)],
)
def test_retry_after(value: str | None, seconds: float | None) -> None:
    assert retry_after_seconds(value) == seconds


def test_timeouts_are_settings(tmp_path) -> None:
    cfg = tmp_path / "c.yml"
    cfg.write_text(
        "idle_timeout: 5s\nupstreams:\n  - {name: docker.io, url: http://h, timeout: 2s, failure_pause: 0s}\n"
    )
    settings = load_settings(str(cfg))
    assert settings.idle_timeout == 5 and settings.default.timeout == 2 and settings.default.failure_pause == 0
    assert Settings().default.timeout == 30 and Settings().idle_timeout == 75
    cfg.write_text("upstreams:\n  - {name: docker.io, url: http://h, timeout: 0s}\n")
    with pytest.raises(ConfigError, match="timeout"):
        load_settings(str(cfg))
