"""Settings from the environment: a variable that is not a number where the setting is
one is a ConfigError naming the variable (client and worker alike), not a ValueError."""

from __future__ import annotations

import pytest

from hetbatch.producers.errors import ConfigError
from hetbatch.producers.settings import ClientSettings
from hetbatch.worker.settings import WorkerSettings


def test_a_malformed_number_in_the_environment_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HETBATCH_WAIT_REPLICAS", "abc")
    with pytest.raises(ConfigError, match="HETBATCH_WAIT_REPLICAS='abc' is not an integer"):
        ClientSettings.from_env()
    monkeypatch.delenv("HETBATCH_WAIT_REPLICAS")
    monkeypatch.setenv("HETBATCH_CONCURRENCY", "8 threads")
    with pytest.raises(ConfigError, match="HETBATCH_CONCURRENCY='8 threads' is not an integer"):
        WorkerSettings.from_env()
    monkeypatch.setenv("HETBATCH_CONCURRENCY", "8")
    assert WorkerSettings.from_env().concurrency == 8
