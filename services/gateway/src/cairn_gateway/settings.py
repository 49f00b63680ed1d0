from pydantic import Field

from cairn_runtime.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    service_name: str = "gateway"
    http_host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=1, le=65535)
    status_cache_ttl_s: int = Field(300, ge=0, description="Cache of finished jobs' status in Redis (0: off)")
