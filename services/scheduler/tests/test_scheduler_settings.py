"""Scheduler settings through the one settings pattern (cairn_runtime.settings.ServiceSettings)."""

import pytest

from cairn_scheduler.settings import SchedulerSettings


def test_null_in_the_environment_unsets_an_optional_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cap with a default (64) can be switched off from the environment, which has no None."""
    assert SchedulerSettings().tenant_max_in_flight_shards == 64
    monkeypatch.setenv("CAIRN_TENANT_MAX_IN_FLIGHT_SHARDS", "null")
    monkeypatch.setenv("CAIRN_TRACE_EXPORTER", "none")  # a text value "none" stays text
    settings = SchedulerSettings()
    assert settings.tenant_max_in_flight_shards is None
    assert settings.trace_exporter == "none"
