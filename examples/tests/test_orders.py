"""The example pipeline, run in-process with cairn_sdk.testing (no Cairn services needed)."""

import pytest
from pydantic import ValidationError

from cairn_example_pipelines.orders import OrdersParams, OrdersPipeline
from cairn_sdk import Bounds, Bucket
from cairn_sdk.testing import bounds_of, drain


def test_every_order_of_the_range_is_stored_once_under_its_business_key() -> None:
    records = drain(OrdersPipeline, {"shop": "acme", "first_order": 10, "last_order": 60}, limit=7)

    assert [r["_id"] for r in records] == [f"acme:{n}" for n in range(10, 60)]
    assert {r["currency"] for r in records} == {"EUR"}


def test_a_rerun_reads_the_same_orders() -> None:
    params = {"shop": "acme", "last_order": 30, "currency": "USD"}

    assert drain(OrdersPipeline, params, limit=4) == drain(OrdersPipeline, params, limit=11)


def test_clean_drops_orders_below_the_minimum_total() -> None:
    every = drain(OrdersPipeline, {"shop": "acme", "last_order": 200})
    kept = drain(OrdersPipeline, {"shop": "acme", "last_order": 200, "min_total_cents": 25_000})

    assert 0 < len(kept) < len(every)
    assert all(r["total_cents"] >= 25_000 for r in kept)


def test_the_work_space_is_the_order_numbers() -> None:
    bounds = bounds_of(OrdersPipeline, {"shop": "acme", "first_order": 5, "last_order": 9})

    assert (bounds.start, bounds.end) == (5, 9)


def test_hash_mod_buckets_split_the_orders_between_shards() -> None:
    params = {"shop": "acme", "last_order": 100}
    seen = []
    for remainder in range(3):
        seen += drain(OrdersPipeline, params, bounds=Bounds(1, 100, Bucket(3, remainder)))

    assert sorted(r["number"] for r in seen) == list(range(1, 100))


@pytest.mark.parametrize(
    "params, field",
    [({"shop": "Acme!", "last_order": 5}, "shop"), ({"shop": "acme", "last_order": 5, "currency": "JPY"}, "currency")],
)
def test_wrong_params_are_refused_naming_the_field(params: dict, field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        OrdersParams.model_validate(params)

    assert caught.value.errors()[0]["loc"] == (field,)


def test_the_catalog_entry_announces_the_schema_and_the_space() -> None:
    entry = OrdersPipeline.catalog_entry()

    assert entry["name"] == "example_orders" and entry["version"] == "1"
    assert entry["params_schema"]["properties"]["currency"]["enum"] == ["EUR", "USD", "GBP"]
    assert entry["space"] == [{"kind": "key_range", "start_field": "first_order", "end_field": "last_order", "count_field": None}]
