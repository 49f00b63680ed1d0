"""The checkpoint write of every batch (the hot path `make bench` profiles) and the benchmark-only
worker's leases that skip it (bench/uncheckpointed_worker.py): by primary key, still fenced;
skipped means only a shard's last write."""

import time
from typing import Any

from celery import Celery

from bench.uncheckpointed_worker import UncheckpointedLeases
from cairn_contracts.store import CHECKPOINTS, SHARDS
from cairn_ingest_worker.context import build_context
from cairn_ingest_worker.leases import ShardLeases
from cairn_ingest_worker.settings import WorkerSettings
from cairn_ingest_worker.store import WriteCounts


class SpyCollection:
    """Delegates to a real collection and remembers the filters of its single-document updates."""

    def __init__(self, collection: Any) -> None:
        self._collection = collection
        self.update_filters: list[dict[str, Any]] = []

    def update_one(self, filter: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        self.update_filters.append(filter)
        return self._collection.update_one(filter, *args, **kwargs)

    def find_one_and_update(self, filter: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        # The batch commit is a find_one_and_update (it reads the cancel flag in the same trip).
        self.update_filters.append(filter)
        return self._collection.find_one_and_update(filter, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._collection, name)


def test_batch_checkpoints_match_the_checkpoint_by_id_and_stay_fenced(db, seed_shard) -> None:
    key = seed_shard(db, "job", 0, 0, 300)
    spy = SpyCollection(db[CHECKPOINTS])
    holder = ShardLeases(db[SHARDS], spy, "worker-a", 0.05)
    claim = holder.claim(key)
    assert claim is not None and claim.checkpoint_id == f"{key}/main"

    assert holder.commit(claim, 100, 100, WriteCounts(inserted=100, duplicate=0)).stored
    assert spy.update_filters[-1] == {"_id": claim.checkpoint_id, "fencing_token": claim.token}
    assert db[CHECKPOINTS].find_one({"_id": f"{key}/main"})["cursor"] == 100

    time.sleep(0.2)  # the first lease expires; another worker takes over
    newer = ShardLeases(db[SHARDS], db[CHECKPOINTS], "worker-b", 30).claim(key)
    assert newer is not None and newer.token > claim.token

    assert not holder.commit(claim, 200, 100, WriteCounts(inserted=100, duplicate=0)).stored  # fenced: the old holder moves nothing
    stored = db[CHECKPOINTS].find_one({"_id": f"{key}/main"})
    assert (stored["cursor"], stored["records_done"], stored["fencing_token"]) == (100, 100, newer.token)


def test_uncheckpointed_leases_write_only_the_last_checkpoint_with_the_totals(db, seed_shard) -> None:
    key = seed_shard(db, "job", 0, 0, 300)
    leases = UncheckpointedLeases(db[SHARDS], db[CHECKPOINTS], "bench-worker", 30)
    claim = leases.claim(key)
    assert claim is not None

    assert leases.commit(claim, 100, 100, WriteCounts(inserted=100, duplicate=0)).stored
    assert leases.commit(claim, 200, 100, WriteCounts(inserted=90, duplicate=10)).stored
    untouched = db[CHECKPOINTS].find_one({"_id": f"{key}/main"})
    assert (untouched["cursor"], untouched["records_done"], untouched["batches"]) == (None, 0, 0)

    assert leases.commit(claim, 300, 100, WriteCounts(inserted=100, duplicate=0), done=True).stored
    final = db[CHECKPOINTS].find_one({"_id": f"{key}/main"})
    assert (final["cursor"], final["records_done"], final["records_written"], final["records_redone"]) == (300, 300, 290, 10)


def test_the_production_worker_has_no_switch_to_skip_checkpoints(monkeypatch) -> None:
    # The benchmark's leases are injected at its own entry point only (bench/uncheckpointed_worker.py).
    monkeypatch.setenv("CAIRN_BENCH_DISABLE_CHECKPOINTS", "1")
    assert not hasattr(WorkerSettings(_env_file=None), "bench_disable_checkpoints")
    context = build_context(WorkerSettings(_env_file=None), Celery("bench-switch-test"))
    assert type(context.runner.leases) is ShardLeases
    context.runner.jobs.database.client.close()
