"""Contracts of the task API: the jobs document, cancel messages and topology, schedule timing."""

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from cairn_contracts import store, topology
from cairn_contracts.clock import from_ms, to_ms
from cairn_contracts.messages import CancelJob, ShardFinished
from cairn_contracts.schedules import ScheduleTiming
from cairn_contracts.states import JobState

SPEC = {"pipeline": "synthetic", "params": {"count": 10}, "name": "Nightly", "priority": 4}


# --- the jobs document -------------------------------------------------------------------------
def test_job_record_document_has_the_store_layout() -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

    document = store.JobRecord.new(SPEC, "acme", now=now).to_document()

    assert set(document) == {
        "_id", "tenant", "name", "pipeline", "priority", "spec", "spec_fingerprint", "state",
        "created_at", "created_at_ms", "command_published_at",
    }
    assert (document["tenant"], document["name"], document["pipeline"], document["priority"]) == ("acme", "Nightly", "synthetic", 4)
    assert document["state"] == JobState.PENDING and document["command_published_at"] is None
    assert document["created_at"] == now and document["created_at_ms"] == to_ms(now)
    assert document["spec"]["params"]["count"] == 10


def test_job_record_with_an_idempotency_key_has_a_deterministic_id() -> None:
    first = store.JobRecord.new(SPEC, "acme", idempotency_key="k-1")
    again = store.JobRecord.new(SPEC, "acme", idempotency_key="k-1")
    other_tenant = store.JobRecord.new(SPEC, "globex", idempotency_key="k-1")

    assert first.id == again.id == store.job_id_for("acme", "k-1")
    assert other_tenant.id != first.id
    assert first.to_document()["idempotency_key"] == "k-1"
    assert store.JobRecord.new(SPEC, "acme").id != store.JobRecord.new(SPEC, "acme").id


def test_fingerprint_ignores_key_order_and_defaults_but_not_values() -> None:
    spelled_out = {**SPEC, "sharding": {"strategy": "range", "shards": 1}, "batch_size": 1000}

    assert store.spec_fingerprint(store.JobRecord.new(SPEC, "t").job_spec()) == store.spec_fingerprint(
        store.JobRecord.new(spelled_out, "t").job_spec()
    )
    assert store.JobRecord.new(SPEC, "t").spec_fingerprint != store.JobRecord.new({**SPEC, "priority": 1}, "t").spec_fingerprint


def test_schedule_runs_carry_their_schedule() -> None:
    document = store.JobRecord.new(SPEC, "acme", idempotency_key="schedule:s1:3", schedule_id="s1", schedule_run=3).to_document()

    assert (document["schedule_id"], document["schedule_run"], document["idempotency_key"]) == ("s1", 3, "schedule:s1:3")


def test_job_lock_key_carries_the_tenant() -> None:
    assert store.JOB_LOCK_KEY.format(prefix="p", tenant="acme", fingerprint="f") == "p:joblock:acme:f"


# --- cancel --------------------------------------------------------------------------------------
def test_cancel_has_its_own_queue_bound_to_the_commands_exchange() -> None:
    spec = topology.queue_spec(topology.QUEUE_SCHEDULER_CONTROL)

    assert spec.bindings == ((topology.EXCHANGE_COMMANDS, topology.ROUTING_CANCEL_JOB),)
    start = topology.queue_spec(topology.QUEUE_SCHEDULER_COMMANDS)
    assert (topology.EXCHANGE_COMMANDS, topology.ROUTING_CANCEL_JOB) not in start.bindings
    assert topology.ROUTING_SHARD_CANCELLED.startswith("shard.")  # reaches the events queues


def test_cancel_job_and_cancelled_shard_messages_validate() -> None:
    command = CancelJob.model_validate_json(CancelJob(job_id="j", tenant="acme").model_dump_json())
    event = ShardFinished(job_id="j", shard_key="j:0000", outcome="cancelled", records_done=30)

    assert (command.job_id, command.tenant, command.schema_version) == ("j", "acme", 1)
    assert event.outcome == "cancelled"
    with pytest.raises(ValidationError):
        ShardFinished(job_id="j", shard_key="j:0000", outcome="vanished", records_done=0)  # type: ignore[arg-type]


# --- schedule timing -----------------------------------------------------------------------------
def ms(iso: str) -> int:
    return to_ms(datetime.fromisoformat(iso))


def runs(timing: ScheduleTiming, after: str, count: int, anchor_ms: int = 0) -> list[str]:
    found, cursor = [], ms(after)
    for number in range(count):
        due = timing.next_run_ms(cursor, anchor_ms=anchor_ms, runs_done=number)
        if due is None:
            break
        found.append(from_ms(due).isoformat())
        cursor = due
    return found


def test_a_daily_cron_runs_once_on_the_night_the_clocks_go_back() -> None:
    timing = ScheduleTiming(kind="cron", cron="30 2 * * *", timezone="Europe/Berlin")

    # 2026-10-25 03:00 CEST becomes 02:00 CET: 02:30 happens twice, the job runs once (CEST).
    assert runs(timing, "2026-10-24T12:00:00+02:00", 3) == [
        "2026-10-25T00:30:00+00:00",
        "2026-10-26T01:30:00+00:00",
        "2026-10-27T01:30:00+00:00",
    ]


def test_a_daily_cron_whose_time_is_skipped_runs_right_after_the_clocks_go_forward() -> None:
    timing = ScheduleTiming(kind="cron", cron="30 2 * * *", timezone="Europe/Berlin")

    # 2026-03-29 02:00 CET becomes 03:00 CEST: 02:30 does not exist; the run comes at 03:00 CEST.
    assert runs(timing, "2026-03-28T12:00:00+01:00", 2) == ["2026-03-29T01:00:00+00:00", "2026-03-30T00:30:00+00:00"]


def test_an_hourly_cron_runs_at_every_real_hour_across_the_change() -> None:
    timing = ScheduleTiming(kind="cron", cron="0 * * * *", timezone="Europe/Berlin")

    assert runs(timing, "2026-10-24T22:30:00+00:00", 4) == [
        "2026-10-24T23:00:00+00:00", "2026-10-25T00:00:00+00:00", "2026-10-25T01:00:00+00:00", "2026-10-25T02:00:00+00:00",
    ]


def test_interval_runs_keep_their_phase_and_stop_at_max_runs() -> None:
    anchor = ms("2026-01-01T00:00:10+00:00")
    timing = ScheduleTiming(kind="interval", interval_s=2, max_runs=3)

    assert runs(timing, "2026-01-01T00:00:00+00:00", 10, anchor_ms=anchor) == [
        "2026-01-01T00:00:10+00:00", "2026-01-01T00:00:12+00:00", "2026-01-01T00:00:14+00:00",
    ]
    # a scheduler back after a long pause: the next run is the next tick of the same phase
    assert timing.next_run_ms(ms("2026-01-01T00:01:05+00:00"), anchor_ms=anchor, runs_done=1) == ms("2026-01-01T00:01:06+00:00")


def test_start_and_end_bound_the_runs() -> None:
    timing = ScheduleTiming(
        kind="cron", cron="0 12 * * *", start_at=datetime(2026, 5, 3, tzinfo=UTC), end_at=datetime(2026, 5, 4, 13, tzinfo=UTC)
    )

    assert runs(timing, "2026-05-01T00:00:00+00:00", 5) == ["2026-05-03T12:00:00+00:00", "2026-05-04T12:00:00+00:00"]


def test_a_one_off_runs_once() -> None:
    timing = ScheduleTiming(kind="once", at=datetime(2026, 7, 1, 9, 30, tzinfo=UTC))

    assert runs(timing, "2026-06-01T00:00:00+00:00", 3) == ["2026-07-01T09:30:00+00:00"]
    assert timing.next_run_ms(ms("2026-07-01T09:30:00+00:00"), anchor_ms=0) is None


@pytest.mark.parametrize(
    "body, field",
    [
        ({"kind": "cron", "cron": "61 * * * *"}, "cron"),
        ({"kind": "cron", "cron": "* * * *"}, "cron"),
        ({"kind": "cron"}, "cron"),
        ({"kind": "cron", "cron": "* * * * *", "timezone": "Mars/Olympus"}, "timezone"),
        ({"kind": "interval"}, "interval_s"),
        ({"kind": "interval", "interval_s": 0}, "interval_s"),
        ({"kind": "once"}, "at"),
        ({"kind": "interval", "interval_s": 5, "at": "2026-01-01T00:00:00Z"}, "at"),
        ({"kind": "weekly"}, "kind"),
    ],
)
def test_invalid_timing_names_the_field(body: dict, field: str) -> None:
    with pytest.raises(ValidationError) as error:
        ScheduleTiming.model_validate(body)

    assert field in [e["loc"][0] for e in error.value.errors()]
