"""Config: file < environment < overrides, and one-line errors naming the key."""

from pathlib import Path

import pytest

from cargohold.config import ConfigError, load_settings


def test_defaults_and_env_override(tmp_path: Path) -> None:
    settings = load_settings(
        None, environ={"CARGOHOLD_UPSTREAMS__0__TAG_TTL": "5m", "CARGOHOLD_LISTEN": "127.0.0.1:6000"}
    )
    assert settings.listen == "127.0.0.1:6000"
    assert settings.upstreams[0].name == "docker.io" and settings.upstreams[0].tag_ttl == 300


def test_unknown_key_and_bad_value_name_the_key(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("listen: 127.0.0.1:5000\nbogus: 1\n")
    with pytest.raises(ConfigError, match="bogus: unknown key"):
        load_settings(config, environ={})
    config.write_text("upstreams:\n  - name: docker.io\n    url: https://x\n    tag_ttl: 10x\n")
    with pytest.raises(ConfigError, match=r"upstreams\.0\.tag_ttl"):
        load_settings(config, environ={})
