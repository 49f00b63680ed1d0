"""JobSpec: defaults, the pipeline union, sharding, and the parameters of each pipeline."""

import pytest
from pydantic import ValidationError

from cairn_contracts.jobs import (
    JOB_SPEC_ADAPTER,
    HashModSharding,
    LeaseFrontierSharding,
    MongoRangeJobSpec,
    RangeSharding,
    SyntheticJobSpec,
)
from cairn_contracts.pipelines import MongoRangeParams, SyntheticParams
from cairn_contracts.states import JobState, Priority, ShardState

SPEC = JOB_SPEC_ADAPTER


def _errors(body: dict) -> list[dict]:
    with pytest.raises(ValidationError) as caught:
        SPEC.validate_python(body)
    return caught.value.errors()


def test_minimal_synthetic_spec_gets_the_documented_defaults() -> None:
    spec = SPEC.validate_python({"pipeline": "synthetic", "params": {"count": 10}})

    assert isinstance(spec, SyntheticJobSpec)
    assert spec.name is None
    assert spec.sharding == RangeSharding(strategy="range", shards=1)
    assert spec.priority is Priority.NORMAL
    assert spec.batch_size == 1000
    assert spec.target_collection == "records"
    assert spec.params == SyntheticParams(count=10)
    assert (spec.params.start, spec.params.record_size, spec.params.key_prefix) == (0, 100, "syn")
    assert spec.params.fail_at_key is None and spec.params.fail_times is None


def test_pipeline_name_selects_the_params_model() -> None:
    synthetic = SPEC.validate_python({"pipeline": "synthetic", "params": {"count": 3}})
    mongo = SPEC.validate_python({"pipeline": "mongo_range", "params": {"collection": "src", "start": 0, "end": 9}})

    assert isinstance(synthetic, SyntheticJobSpec) and isinstance(synthetic.params, SyntheticParams)
    assert isinstance(mongo, MongoRangeJobSpec) and isinstance(mongo.params, MongoRangeParams)
    assert mongo.params.key_field == "_id"


def test_params_of_the_other_pipeline_are_rejected() -> None:
    errors = _errors({"pipeline": "synthetic", "params": {"collection": "src", "start": 0, "end": 9}})

    assert {e["type"] for e in errors} >= {"missing", "extra_forbidden"}
    assert all(e["loc"][:2] == ("synthetic", "params") for e in errors)


def test_unknown_pipeline_is_rejected_by_the_discriminator() -> None:
    errors = _errors({"pipeline": "ftp_dump", "params": {"count": 1}})

    assert [e["type"] for e in errors] == ["union_tag_invalid"]
    assert errors[0]["ctx"]["tag"] == "ftp_dump"


def test_missing_pipeline_is_rejected() -> None:
    assert [e["type"] for e in _errors({"params": {"count": 1}})] == ["union_tag_not_found"]


def test_sharding_strategy_defaults_to_range() -> None:
    spec = SPEC.validate_python({"pipeline": "synthetic", "params": {"count": 8}, "sharding": {"shards": 4}})

    assert spec.sharding == RangeSharding(strategy="range", shards=4)


def test_unknown_sharding_strategy_is_rejected() -> None:
    errors = _errors({"pipeline": "synthetic", "params": {"count": 8}, "sharding": {"strategy": "round_robin", "shards": 2}})

    assert [e["type"] for e in errors] == ["union_tag_invalid"]
    assert errors[0]["loc"] == ("synthetic", "sharding")
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

    assert errors[0]["loc"] == ("synthetic", "sharding", "range", "shards")


@pytest.mark.parametrize(
    "body, location",
    [
        ({"pipeline": "synthetic", "params": {"count": 1}, "colour": "red"}, ("synthetic", "colour")),
        ({"pipeline": "synthetic", "params": {"count": 1, "colour": "red"}}, ("synthetic", "params", "colour")),
        (
            {"pipeline": "synthetic", "params": {"count": 1}, "sharding": {"shards": 2, "colour": "red"}},
            ("synthetic", "sharding", "range", "colour"),
        ),
    ],
)
def test_extra_fields_are_forbidden_at_every_level(body: dict, location: tuple) -> None:
    errors = _errors(body)

    assert [(e["type"], e["loc"]) for e in errors] == [("extra_forbidden", location)]


@pytest.mark.parametrize(
    "params, field",
    [({"count": 0}, "count"), ({"count": -1}, "count"), ({"count": 1, "start": -1}, "start"), ({"count": 1, "key_prefix": "a b"}, "key_prefix")],
)
def test_synthetic_params_are_validated(params: dict, field: str) -> None:
    errors = _errors({"pipeline": "synthetic", "params": params})

    assert errors[0]["loc"] == ("synthetic", "params", field)


@pytest.mark.parametrize("priority, expected", [(1, Priority.LOW), (4, Priority.CRITICAL)])
def test_priority_accepts_the_four_levels(priority: int, expected: Priority) -> None:
    assert SPEC.validate_python({"pipeline": "synthetic", "params": {"count": 1}, "priority": priority}).priority is expected


@pytest.mark.parametrize("priority", [0, 5])
def test_priority_outside_the_four_levels_is_rejected(priority: int) -> None:
    assert _errors({"pipeline": "synthetic", "params": {"count": 1}, "priority": priority})[0]["loc"] == ("synthetic", "priority")


def test_target_collection_must_be_a_plain_name() -> None:
    errors = _errors({"pipeline": "synthetic", "params": {"count": 1}, "target_collection": "system.users"})

    assert errors[0]["loc"] == ("synthetic", "target_collection")


@pytest.mark.parametrize("start, end", [(5, 5), (10, 3)])
def test_mongo_range_end_must_be_greater_than_start(start: int, end: int) -> None:
    with pytest.raises(ValidationError, match="end must be greater than start"):
        MongoRangeParams(collection="src", start=start, end=end)


def test_mongo_range_key_range_is_start_to_end() -> None:
    assert MongoRangeParams(collection="src", start=-5, end=7).key_range() == (-5, 7)


def test_synthetic_key_range_is_start_plus_count() -> None:
    assert SyntheticParams(start=100, count=25).key_range() == (100, 125)


def test_synthetic_record_key_is_prefixed_and_zero_padded() -> None:
    params = SyntheticParams(count=1, key_prefix="abc")

    assert params.record_key(42) == "abc-000000000042"
    assert params.record_key(123_456_789_012) == "abc-123456789012"


def test_specs_are_frozen() -> None:
    spec = SPEC.validate_python({"pipeline": "synthetic", "params": {"count": 1}})

    with pytest.raises(ValidationError):
        spec.batch_size = 5  # type: ignore[misc]


def test_terminal_states() -> None:
    assert {s for s in JobState if s.is_terminal} == {JobState.SUCCESS, JobState.FAILURE, JobState.CANCELLED}
    assert {s for s in ShardState if s.is_terminal} == {ShardState.SUCCEEDED, ShardState.FAILED, ShardState.CANCELLED}
    assert not JobState.CANCELLING.is_terminal  # a cancel in progress
