"""Which proxy an upstream request leaves through, and the `proxy` setting's check."""

from __future__ import annotations

from pathlib import Path

import pytest

from cargohold.config import ConfigError, load_settings
from cargohold.upstream.egress import Egress


def test_environment_proxies_no_proxy_and_the_configured_one() -> None:
    env = {"http": "http://proxy.test:3128", "https": "proxy.test:3129", "no": "127.0.0.1,.internal.test"}
    egress = Egress(None, env)
    assert egress.proxy_for("http://registry.test/v2/") == "http://proxy.test:3128"
    assert egress.proxy_for("https://registry.test/v2/") == "http://proxy.test:3129"  # scheme-less as curl takes it
    assert egress.proxy_for("http://127.0.0.1:5000/v2/") is None
    assert egress.proxy_for("https://cdn.internal.test/blob") is None
    assert Egress(None, {}).proxy_for("https://registry.test/") is None
    configured = Egress("http://user:pw@own.test:8080", env)  # wins over the environment, NO_PROXY included
    assert configured.proxy_for("http://127.0.0.1:5000/v2/") == "http://user:pw@own.test:8080"


def test_proxy_setting_is_checked_without_echoing_it(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("upstreams:\n  - {name: docker.io, url: 'https://x.test', proxy: 'socks5://u:secret@p.test:1080'}\n")
    with pytest.raises(ConfigError, match="upstreams.0.proxy") as caught:
        load_settings(config, environ={})
    assert "secret" not in str(caught.value)
    config.write_text("upstreams:\n  - {name: docker.io, url: 'https://x.test', proxy: 'https://p.test:3128'}\n")
    assert load_settings(config, environ={}).upstreams[0].proxy == "https://p.test:3128"
