"""JobSpec: defaults, the pipeline name, sharding. A pipeline's params are checked against the
catalog (test_contracts_catalog.py), not by the spec."""

import pytest
from pydantic import ValidationError

from cairn_contracts.jobs import (
    JOB_SPEC_ADAPTER,
    HashModSharding,
    JobSpec,
    LeaseFrontierSharding,
    RangeSharding,
)
from cairn_contracts.states import JobState, Priority, ShardState

SPEC = JOB_SPEC_ADAPTER


def _errors(body: dict) -> list[dict]:
    with pytest.raises(ValidationError) as caught:
        SPEC.validate_python(body)
    return caught.value.errors()


def test_minimal_spec_gets_the_documented_defaults() -> None:
    spec = SPEC.validate_python({"pipeline": "synthetic", "params": {"count": 10}})

    assert isinstance(spec, JobSpec)
    assert spec.name is None
    assert spec.sharding == RangeSharding(strategy="range", shards=1)
    assert spec.priority is Priority.NORMAL
    assert spec.batch_size == 1000
    assert spec.target_collection == "records"
    assert spec.write_mode == "insert" and spec.window is None
    assert spec.params == {"count": 10}  # as given: the catalog's JSON Schema checks them


def test_any_pipeline_name_of_the_name_pattern_is_a_spec_the_catalog_then_checks() -> None:
    spec = SPEC.validate_python({"pipeline": "acme_orders", "params": {"since": "2026-01-01T00:00:00Z"}})

    assert spec.pipeline == "acme_orders" and spec.params == {"since": "2026-01-01T00:00:00Z"}


@pytest.mark.parametrize("name", ["", "Shell", "ftp-dump", "x" * 64, "../etc", "1abc"])
def test_a_pipeline_name_outside_the_pattern_is_rejected(name: str) -> None:
    assert _errors({"pipeline": name, "params": {}})[0]["loc"] == ("pipeline",)


def test_missing_pipeline_is_rejected() -> None:
    assert [(e["type"], e["loc"]) for e in _errors({"params": {"count": 1}})] == [("missing", ("pipeline",))]


def test_params_must_be_an_object_of_storable_values() -> None:
    assert _errors({"pipeline": "synthetic", "params": [1, 2]})[0]["loc"] == ("params",)
    assert _errors({"pipeline": "synthetic", "params": {"name": "\ud800"}})[0]["loc"] == ("params", "name")
    assert _errors({"pipeline": "synthetic", "params": {"a": [1, float("nan")]}})[0]["loc"] == ("params", "a", 1)


def test_sharding_strategy_defaults_to_range() -> None:
    spec = SPEC.validate_python({"pipeline": "synthetic", "params": {"count": 8}, "sharding": {"shards": 4}})

    assert spec.sharding == RangeSharding(strategy="range", shards=4)


def test_unknown_sharding_strategy_is_rejected() -> None:
    errors = _errors({"pipeline": "synthetic", "params": {"count": 8}, "sharding": {"strategy": "round_robin", "shards": 2}})

    assert [e["type"] for e in errors] == ["union_tag_invalid"]
    assert errors[0]["loc"] == ("sharding",)
    assert errors[0]["ctx"]["tag"] == "round_robin"


@pytest.mark.parametrize(
    "sharding, model",
    [
        ({"strategy": "range", "shards": 3}, RangeSharding),
        ({"strategy": "hash_mod", "shards": 3}, HashModSharding),
        ({"strategy": "lease_frontier", "shards": 3, "item_size": 50}, LeaseFrontierSharding),
    ],
)
def test_sharding_strategy_selects_its_model(sharding: dict, model: type) -> None:
    spec = SPEC.validate_python({"pipeline": "synthetic", "params": {"count": 8}, "sharding": sharding})

    assert isinstance(spec.sharding, model)
    assert spec.sharding.strategy == sharding["strategy"] and spec.sharding.shards == 3


def test_lease_frontier_item_size_has_a_default() -> None:
    spec = SPEC.validate_python({"pipeline": "synthetic", "params": {"count": 8}, "sharding": {"strategy": "lease_frontier", "shards": 2}})

    assert spec.sharding.item_size == 10_000


@pytest.mark.parametrize("strategy", ["hash_mod", "lease_frontier"])
def test_explicit_strategies_require_a_shard_count(strategy: str) -> None:
    errors = _errors({"pipeline": "synthetic", "params": {"count": 8}, "sharding": {"strategy": strategy}})

    assert [(e["type"], e["loc"][-1]) for e in errors] == [("missing", "shards")]


@pytest.mark.parametrize("shards", [0, 1025])
def test_shard_count_is_bounded(shards: int) -> None:
    errors = _errors({"pipeline": "synthetic", "params": {"count": 8}, "sharding": {"shards": shards}})

    assert errors[0]["loc"] == ("sharding", "range", "shards")


@pytest.mark.parametrize(
    "body, location",
    [
        ({"pipeline": "synthetic", "params": {"count": 1}, "colour": "red"}, ("colour",)),
        (
            {"pipeline": "synthetic", "params": {"count": 1}, "sharding": {"shards": 2, "colour": "red"}},
            ("sharding", "range", "colour"),
        ),
    ],
)
def test_extra_fields_are_forbidden_at_every_level(body: dict, location: tuple) -> None:
    errors = _errors(body)

    assert [(e["type"], e["loc"]) for e in errors] == [("extra_forbidden", location)]


@pytest.mark.parametrize("priority, expected", [(1, Priority.LOW), (4, Priority.CRITICAL)])
def test_priority_accepts_the_four_levels(priority: int, expected: Priority) -> None:
    assert SPEC.validate_python({"pipeline": "synthetic", "params": {"count": 1}, "priority": priority}).priority is expected


@pytest.mark.parametrize("priority", [0, 5])
def test_priority_outside_the_four_levels_is_rejected(priority: int) -> None:
    assert _errors({"pipeline": "synthetic", "params": {"count": 1}, "priority": priority})[0]["loc"] == ("priority",)


def test_target_collection_must_be_a_plain_name() -> None:
    errors = _errors({"pipeline": "synthetic", "params": {"count": 1}, "target_collection": "system.users"})

    assert errors[0]["loc"] == ("target_collection",)


@pytest.mark.parametrize("mode", ["insert", "upsert", "replace_window"])
def test_write_mode_is_one_of_three(mode: str) -> None:
    assert SPEC.validate_python({"pipeline": "synthetic", "params": {}, "write_mode": mode}).write_mode == mode
    assert _errors({"pipeline": "synthetic", "params": {}, "write_mode": "append"})[0]["loc"] == ("write_mode",)


def test_a_window_is_only_for_replace_window() -> None:
    assert SPEC.validate_python({"pipeline": "synthetic", "params": {}, "write_mode": "replace_window", "window": "w"}).window == "w"
    assert _errors({"pipeline": "synthetic", "params": {}, "window": "w"})[0]["loc"] == ("window",)


def test_specs_are_frozen() -> None:
    spec = SPEC.validate_python({"pipeline": "synthetic", "params": {"count": 1}})

    with pytest.raises(ValidationError):
        spec.batch_size = 5  # type: ignore[misc]


def test_terminal_states() -> None:
    assert {s for s in JobState if s.is_terminal} == {JobState.SUCCESS, JobState.FAILURE, JobState.CANCELLED}
    assert {s for s in ShardState if s.is_terminal} == {ShardState.SUCCEEDED, ShardState.FAILED, ShardState.CANCELLED}
    assert not JobState.CANCELLING.is_terminal  # a cancel in progress
