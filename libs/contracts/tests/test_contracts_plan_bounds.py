"""A job plans at most MAX_ITEMS_PER_JOB shards or items (issue 11, item 8): a lease-frontier spec
whose key range would cut into more work items is refused, naming `sharding.item_size`."""

import pytest
from pydantic import ValidationError

from cairn_contracts.jobs import JOB_SPEC_ADAPTER, MAX_ITEMS_PER_JOB, lease_frontier_items
from cairn_contracts.messages import StartJob
from cairn_contracts.pipelines import MAX_KEY

SPEC = JOB_SPEC_ADAPTER


def frontier(item_size: int | None = None) -> dict:
    sharding = {"strategy": "lease_frontier", "shards": 4}
    return sharding if item_size is None else {**sharding, "item_size": item_size}


@pytest.mark.parametrize(
    "body",
    [
        {"pipeline": "synthetic", "params": {"count": 10**9}, "sharding": frontier(1)},
        {"pipeline": "synthetic", "params": {"count": 10**9}, "sharding": frontier()},  # default item_size 10,000
        {"pipeline": "synthetic", "params": {"count": MAX_ITEMS_PER_JOB + 1}, "sharding": frontier(1)},
        {"pipeline": "mongo_range", "params": {"collection": "src", "start": -MAX_KEY, "end": MAX_KEY}, "sharding": frontier(10**9)},
    ],
)
def test_a_plan_of_too_many_items_is_refused_naming_item_size(body: dict) -> None:
    with pytest.raises(ValidationError) as caught:
        SPEC.validate_python(body)

    [error] = caught.value.errors()
    assert error["type"] == "too_many_items"
    assert error["loc"] == (body["pipeline"], "sharding", "item_size")
    assert error["ctx"]["max_items"] == MAX_ITEMS_PER_JOB
    assert "at most 10000" in error["msg"] and "item_size" in error["msg"]


def test_the_refusal_names_the_smallest_item_size_that_fits() -> None:
    with pytest.raises(ValidationError) as caught:
        SPEC.validate_python({"pipeline": "synthetic", "params": {"count": 10**9}, "sharding": frontier(1)})
    smallest = caught.value.errors()[0]["ctx"]["smallest"]

    fits = SPEC.validate_python({"pipeline": "synthetic", "params": {"count": 10**9}, "sharding": frontier(smallest)})
    assert lease_frontier_items((0, 10**9), fits.sharding.item_size) == MAX_ITEMS_PER_JOB


def test_exactly_the_maximum_is_accepted() -> None:
    spec = SPEC.validate_python({"pipeline": "synthetic", "params": {"count": MAX_ITEMS_PER_JOB}, "sharding": frontier(1)})

    assert lease_frontier_items(spec.params.key_range(), spec.sharding.item_size) == MAX_ITEMS_PER_JOB


@pytest.mark.parametrize("sharding", [{"strategy": "range", "shards": 1024}, {"strategy": "hash_mod", "shards": 1024}])
def test_range_and_hash_mod_are_bounded_by_their_shards_whatever_the_range(sharding: dict) -> None:
    spec = SPEC.validate_python({"pipeline": "synthetic", "params": {"count": 10**9}, "sharding": sharding})

    assert spec.sharding.shards == 1024


def test_item_count_is_exact_for_keys_beyond_a_floats_precision() -> None:
    assert lease_frontier_items((-MAX_KEY, MAX_KEY), 3) == -(-2 * MAX_KEY // 3)
    assert lease_frontier_items((0, 2**62 + 1), 2**61) == 3


def test_a_start_command_carrying_too_large_a_plan_does_not_validate() -> None:
    with pytest.raises(ValidationError):
        StartJob.model_validate(
            {"job_id": "j", "tenant": "t", "spec": {"pipeline": "synthetic", "params": {"count": 10**9}, "sharding": frontier(1)}}
        )
