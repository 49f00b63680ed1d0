from pydantic import Field

from cairn_runtime.settings import ServiceSettings


class SchedulerSettings(ServiceSettings):
    service_name: str = "scheduler"
    reconcile_interval_s: float = Field(5.0, gt=0, description="How often leases are reaped and running jobs rolled up again")
    relay_after_s: float = Field(10.0, gt=0, description="Republish a job's command if unpublished this long")
    redispatch_after_s: float = Field(
        60.0, gt=0, description="A QUEUED shard whose task is provably lost is re-sent once it waited this long"
    )
    lost_task_passes: int = Field(
        2, ge=2, description="Consecutive maintenance passes that must see the ingest queue empty before a task counts as lost"
    )
    retry_poll_max_s: float = Field(
        1.0, gt=0, description="Longest sleep of the due-retry dispatcher (it sleeps until the next due retry, at most this)"
    )
    prefetch: int = Field(8, ge=1)
    gauges_interval_s: float = Field(15.0, gt=0, description="How often queue depths and job/shard counts are refreshed")
    # The task API (issue 5): schedules, cancel sweep, result retention.
    schedule_tick_s: float = Field(1.0, gt=0, description="How often due schedules are looked for")
    result_ttl_s: float = Field(7 * 86_400, gt=0, description="A finished job's result is dropped this long after it finished")
