"""Scheduler settings through the one settings pattern (cairn_runtime.settings.ServiceSettings)."""

import pytest
from pydantic import ValidationError

from cairn_contracts.tenancy import MAX_CAIRN_DATABASE_NAME, tenant_database
from cairn_scheduler.settings import SchedulerSettings


def test_null_in_the_environment_unsets_an_optional_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cap with a default (64) can be switched off from the environment, which has no None."""
    assert SchedulerSettings().tenant_max_in_flight_shards == 64
    monkeypatch.setenv("CAIRN_TENANT_MAX_IN_FLIGHT_SHARDS", "null")
    monkeypatch.setenv("CAIRN_TRACE_EXPORTER", "none")  # a text value "none" stays text
    settings = SchedulerSettings()
    assert settings.tenant_max_in_flight_shards is None
    assert settings.trace_exporter == "none"


def test_a_cairn_database_name_too_long_for_its_tenants_databases_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """MongoDB allows 63 bytes; a tenant's database is `<database>_th_<24 hex>` at the longest."""
    monkeypatch.setenv("CAIRN_MONGODB_DATABASE", "c" * MAX_CAIRN_DATABASE_NAME)
    longest = SchedulerSettings().mongodb_database
    assert len(tenant_database(longest, "Tenant.With.Capitals")) == 63
    monkeypatch.setenv("CAIRN_MONGODB_DATABASE", "c" * (MAX_CAIRN_DATABASE_NAME + 1))
    with pytest.raises(ValidationError, match="mongodb_database"):
        SchedulerSettings()
    monkeypatch.setenv("CAIRN_MONGODB_DATABASE", "my.db")  # a '.' would end the name at the server
    with pytest.raises(ValidationError, match="mongodb_database"):
        SchedulerSettings()
