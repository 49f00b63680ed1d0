"""The stable hash that decides a record's hash-mod bucket."""

from cairn_contracts.partitioning import bucket_of, stable_hash


def test_stable_hash_is_a_fixed_function_of_the_key() -> None:
    # Fixed values: a change here would move records between buckets of running jobs.
    assert stable_hash("syn-000000000000") == 11675336523092584741
    assert stable_hash(42) == 6319743179241711738
    assert stable_hash(42) == stable_hash("42")
    assert stable_hash("a") != stable_hash("b")
    assert 0 <= stable_hash("anything") < 2**64


def test_bucket_of_is_in_range_and_spreads_keys() -> None:
    buckets = [bucket_of(f"syn-{i:012d}", 4) for i in range(4000)]

    assert set(buckets) == {0, 1, 2, 3}
    assert all(700 < buckets.count(b) < 1300 for b in range(4))


def test_one_bucket_holds_everything() -> None:
    assert {bucket_of(i, 1) for i in range(100)} == {0}
