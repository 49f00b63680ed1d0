from pydantic import Field

from cairn_runtime.settings import ServiceSettings


class DlqSettings(ServiceSettings):
    service_name: str = "dlq-handler"
    prefetch: int = Field(16, ge=1)
    raw_payload_threshold_bytes: int = Field(
        64 * 1024, ge=1, description="Original bodies larger than this go to GridFS (raw_payloads), not task_errors"
    )
    settle_interval_s: float = Field(5.0, gt=0, description="How often replays in flight are settled from shard states")
