from pydantic import Field

from cairn_runtime.settings import ServiceSettings


class DlqSettings(ServiceSettings):
    service_name: str = "dlq-handler"
    prefetch: int = Field(16, ge=1)
