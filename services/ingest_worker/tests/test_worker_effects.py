"""The TaskDedup ledger (RunContext.effects) against the MongoDB-wire server: a re-run skips a done
effect; at_least_once calls again after a crash mid-call, at_most_once never does."""

from collections.abc import Callable
from typing import Any

import pytest
from pydantic import BaseModel

from cairn_contracts.messages import RunShard
from cairn_contracts.states import ShardState
from cairn_contracts.store import CHECKPOINTS, DEDUP, JOBS, SHARDS
from cairn_ingest_worker import pipelines
from cairn_ingest_worker.effects import TaskDedupLedger
from cairn_ingest_worker.leases import ShardLeases
from cairn_ingest_worker.runner import ShardRunner, run_shard
from cairn_sdk import Batch, Bounds, Pipeline, Single
from cairn_sdk.effects import EffectBusy, LocalEffects


def ledger(db, *, token: int = 1, shard_key: str = "job:0000", job_id: str = "job", lease_s: float = 60.0) -> TaskDedupLedger:
    return TaskDedupLedger(db[DEDUP], tenant="t", job_id=job_id, shard_key=shard_key, token=token, lease_s=lease_s)


class Calls:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> dict:
        self.count += 1
        return {"receipt": f"r{self.count}", "items": [1, 2]}


_never_exited: list = []  # guards kept open for the session: no exit handler ever runs


def crash_mid_call(effects: TaskDedupLedger, key: str, **options) -> None:
    """The process dies inside the call: the guard's exit never runs, as after a real SIGKILL."""
    guard = effects.guard(key, **options)
    effect = guard.__enter__()
    _never_exited.append(guard)  # (a collected generator would run its cleanup)
    assert not effect.skip


def test_a_done_effect_is_skipped_by_a_rerun_and_returns_the_recorded_result(db) -> None:
    calls = Calls()
    assert ledger(db).once("notify:1", calls) == {"receipt": "r1", "items": [1, 2]}
    again = ledger(db, token=2).once("notify:1", calls)
    assert calls.count == 1
    assert again == {"receipt": "r1", "items": [1, 2]}
    assert ledger(db).done("notify:1") and not ledger(db).done("notify:2")


def test_the_job_scope_is_per_job_and_the_tenant_scope_across_jobs(db) -> None:
    calls = Calls()
    ledger(db, job_id="a").once("k", calls)
    ledger(db, job_id="b").once("k", calls)
    assert calls.count == 2
    ledger(db, job_id="a").once("k", calls, scope="tenant")
    ledger(db, job_id="b").once("k", calls, scope="tenant")
    assert calls.count == 3


def test_at_least_once_calls_again_after_a_crash_mid_call(db) -> None:
    crash_mid_call(ledger(db, token=1), "charge:1")
    calls = Calls()
    # The shard was claimed again (token 2): the first holder's run is over, the call is redone.
    assert ledger(db, token=2).once("charge:1", calls) == {"receipt": "r1", "items": [1, 2]}
    assert calls.count == 1
    assert ledger(db, token=3).once("charge:1", calls)["receipt"] == "r1"
    assert calls.count == 1


def test_at_least_once_waits_for_a_live_holder_of_another_shard(db) -> None:
    crash_mid_call(ledger(db, shard_key="job:0001", lease_s=60), "k", scope="tenant")
    with pytest.raises(EffectBusy):
        ledger(db, shard_key="job:0002").once("k", Calls(), scope="tenant")


def test_at_least_once_takes_over_an_expired_holder_of_another_shard(db) -> None:
    crash_mid_call(ledger(db, shard_key="job:0001", lease_s=0), "k", scope="tenant")
    calls = Calls()
    ledger(db, shard_key="job:0002").once("k", calls, scope="tenant")
    assert calls.count == 1


def test_at_least_once_forgets_a_call_that_raised(db) -> None:
    def failing() -> None:
        raise ConnectionError("the external system is down")

    with pytest.raises(ConnectionError):
        ledger(db).once("k", failing)
    calls = Calls()
    ledger(db).once("k", calls)
    assert calls.count == 1


def test_at_most_once_never_calls_again_after_a_crash_or_a_failed_call(db) -> None:
    crash_mid_call(ledger(db, token=1), "k1", mode="at_most_once")
    calls = Calls()
    with ledger(db, token=2).guard("k1", mode="at_most_once") as effect:
        assert effect.skip and effect.in_doubt
    assert ledger(db, token=2).once("k1", calls, mode="at_most_once") is None

    def failing() -> None:
        raise TimeoutError("no answer: did it charge?")

    with pytest.raises(TimeoutError):
        ledger(db).once("k2", failing, mode="at_most_once")
    assert ledger(db).once("k2", calls, mode="at_most_once") is None
    assert calls.count == 0
    assert not ledger(db).done("k2")


def test_an_effect_whose_result_cannot_be_stored_is_still_recorded_done(db) -> None:
    calls = Calls()

    def unstorable() -> object:
        calls()
        return object()

    ledger(db).once("k", unstorable)
    assert ledger(db, token=2).once("k", unstorable) is None
    assert calls.count == 1 and ledger(db).done("k")


def test_the_fingerprint_is_stable_and_scoped(db) -> None:
    with ledger(db).guard("k") as effect:
        effect.result = 1
    assert effect.fingerprint == ledger(db, token=9).fingerprint("k") != ledger(db).fingerprint("k", scope="tenant")
    assert db[DEDUP].find_one({"_id": effect.fingerprint})["state"] == "done"


@pytest.mark.parametrize("make", [lambda: LocalEffects("t", "job")])
def test_the_sdk_in_memory_ledger_has_the_same_semantics(make: Callable[[], LocalEffects]) -> None:
    effects = make()
    calls = Calls()
    effects.once("k", calls)
    effects.once("k", calls)
    assert calls.count == 1 and effects.done("k")

    def failing() -> None:
        raise TimeoutError

    with pytest.raises(TimeoutError):
        effects.once("m", failing, mode="at_most_once")
    assert effects.once("m", calls, mode="at_most_once") is None and calls.count == 1


# --- through the runner: a pipeline's context.effects in a real shard run -----------------------


class NotifyParams(BaseModel):
    pages: int


SENT: list[str] = []  # the "external system": every notification it received


class Notifier(Pipeline[NotifyParams]):
    """Stores one record per page item and notifies an external system once per record."""

    name = "notifier"
    Params = NotifyParams
    space = Single()

    def start(self, bounds: Bounds) -> Any:
        return 0

    def read(self, bounds: Bounds, cursor: Any, limit: int) -> Batch:
        records = [{"_id": f"n-{cursor}-{i}", "page": cursor} for i in range(3)]
        return Batch(records, cursor + 1, done=cursor + 1 >= self.params.pages)

    def clean(self, record: dict[str, Any]) -> dict[str, Any] | None:
        assert self.context.effects is not None
        self.context.effects.once(f"notify:{record['_id']}", lambda: SENT.append(record["_id"]))
        return record


@pytest.fixture
def notifier(monkeypatch):
    monkeypatch.setattr(pipelines, "_registered", dict(pipelines._registered))
    pipelines.register_pipeline(Notifier.name, Notifier)
    SENT.clear()


def test_a_rerun_shard_skips_the_side_effects_its_first_run_did(db, seed_job, seed_shard, notifier) -> None:
    seed_job(db, "fx", {"pipeline": "notifier", "params": {"pages": 3}, "target_collection": "out", "write_mode": "upsert"})
    key = seed_shard(db, "fx", 0, 0, 1)
    shard_runner = ShardRunner(
        leases=ShardLeases(db[SHARDS], db[CHECKPOINTS], "worker-a", ttl_s=30),
        jobs=db[JOBS], shards=db[SHARDS], records_db=db, source_db=db, heartbeat_interval_s=5, slice_s=600,
    )
    assert run_shard(shard_runner, RunShard(job_id="fx", shard_key=key), max_attempts=5).kind == "succeeded"
    assert len(SENT) == 9

    # The shard runs again from its start (a crash lost its checkpoint, a replay): records and
    # notifications were all done once, so nothing is written or sent a second time.
    db[SHARDS].update_one({"_id": key}, {"$set": {"state": ShardState.QUEUED}})
    db[CHECKPOINTS].update_one({"shard_key": key}, {"$set": {"cursor": None, "batches": 0, "done": False}})
    assert run_shard(shard_runner, RunShard(job_id="fx", shard_key=key), max_attempts=5).kind == "succeeded"

    assert len(SENT) == 9
    assert db[DEDUP].count_documents({"job_id": "fx", "state": "done"}) == 9
    assert db["out"].count_documents({}) == 9
