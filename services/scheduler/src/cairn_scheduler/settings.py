from pydantic import Field

from cairn_runtime.settings import ServiceSettings


class SchedulerSettings(ServiceSettings):
    service_name: str = "scheduler"
    reconcile_interval_s: float = Field(5.0, gt=0, description="How often running jobs are rolled up again")
    relay_after_s: float = Field(10.0, gt=0, description="Republish a job's command if unpublished this long")
    prefetch: int = Field(8, ge=1)
