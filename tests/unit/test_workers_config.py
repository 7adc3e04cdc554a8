"""`workers` in the configuration: a number or `auto`; `leader` is the supervisor's, not the operator's."""

from __future__ import annotations

import os

import pytest

from cargohold.config import ConfigError, load_settings


def test_auto_is_the_cores_cargohold_may_run_on() -> None:
    settings = load_settings(None, environ={"CARGOHOLD_WORKERS": "auto"})
    assert settings.worker_count == len(os.sched_getaffinity(0))
    assert load_settings(None, environ={}).worker_count == 1


@pytest.mark.parametrize("value", ["0", "-1", "257", "many"])
def test_a_bad_number_of_workers_is_a_one_line_error(value: str) -> None:
    with pytest.raises(ConfigError, match="workers"):
        load_settings(None, environ={"CARGOHOLD_WORKERS": value})


def test_leader_cannot_be_configured() -> None:
    with pytest.raises(ConfigError, match="leader is set by the supervisor"):
        load_settings(None, environ={"CARGOHOLD_LEADER": "false"})
