"""YAML 1.1 reads a bare off/on/yes/no as a boolean: enum-like settings must still take the word,
and every full config shown in the README and docs must pass `cargohold config check`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from cargohold.cli import main
from cargohold.config import ConfigError, Settings, load_settings

REPO = Path(__file__).resolve().parents[2]


def _load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Settings:
    path = tmp_path / "c.yml"
    path.write_text(text)
    return load_settings(path, environ=environ or {})


def test_preset_off_bare_in_yaml(tmp_path: Path) -> None:
    settings = _load(tmp_path, "rate_limit: {preset: off}\n")
    assert settings.rate_limit.preset == "off"


def test_preset_off_in_groups_and_users(tmp_path: Path) -> None:
    text = "rate_limit:\n  groups:\n    monitor: {preset: off}\n  users:\n    ci: {preset: OFF}\n"
    settings = _load(tmp_path, text)
    assert settings.rate_limit.groups["monitor"].preset == "off"
    assert settings.rate_limit.users["ci"].preset == "off"


def test_preset_off_from_environment(tmp_path: Path) -> None:
    settings = load_settings(None, environ={"CARGOHOLD_RATE_LIMIT__PRESET": "off"})
    assert settings.rate_limit.preset == "off"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("rate_limit: {preset: on}\n", "rate_limit.preset"),
        ("log_format: yes\n", "log_format"),
        ("log_level: off\n", "log_level"),
        ("storage: {backend: no}\n", "storage.backend"),
    ],
)
def test_other_yaml_booleans_fail_on_the_word_with_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, text)
    message = str(err.value)
    assert message.startswith(key + ":"), message
    assert "boolean" not in message, message


def _yaml_blocks(path: Path) -> list[str]:
    return re.findall(r"```ya?ml\n(.*?)```", path.read_text(), flags=re.DOTALL)


def _full_configs() -> list[tuple[str, str]]:
    """Blocks whose top-level keys are all settings: those are meant to be a config file."""
    known = set(Settings.model_fields)
    found = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for index, block in enumerate(_yaml_blocks(path)):
            try:
                data = yaml.safe_load(block)
            except yaml.YAMLError:
                continue
            if isinstance(data, dict) and data and set(data) <= known:
                found.append((f"{path.relative_to(REPO)}#{index}", block))
    return found


def test_docs_hold_full_configs() -> None:
    names = [name for name, _ in _full_configs()]
    assert any(n.startswith("docs/ratelimit.md") for n in names), names


@pytest.mark.parametrize(("name", "block"), _full_configs(), ids=[n for n, _ in _full_configs()])
def test_doc_config_passes_config_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, block: str
) -> None:
    path = tmp_path / "config.yml"
    path.write_text(block)
    code = main(["config", "check", str(path)])
    assert code == 0, f"{name}: {capsys.readouterr().err}"


def test_example_config_passes_config_check(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["config", "check", str(REPO / "cargohold.example.yaml")])
    assert code == 0, capsys.readouterr().err
