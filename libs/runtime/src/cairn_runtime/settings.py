"""One settings pattern for every service: pydantic-settings from the environment and `.env`.

Each service subclasses `ServiceSettings` with its own fields; every variable is `CAIRN_<FIELD>`,
except the MongoDB address, which also honours the conventional `MONGODB_URI`.
"""

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from cairn_contracts.tenancy import MAX_CAIRN_DATABASE_NAME


class ServiceSettings(BaseSettings):
    # `CAIRN_X=null` unsets an optional setting (e.g. CAIRN_TENANT_MAX_IN_FLIGHT_SHARDS=null: no cap).
    model_config = SettingsConfigDict(env_prefix="CAIRN_", env_file=".env", extra="ignore", env_parse_none_str="null")

    service_name: str = "cairn"
    mongodb_uri: str = Field(
        "mongodb://127.0.0.1:27017",
        validation_alias=AliasChoices("MONGODB_URI", "CAIRN_MONGODB_URI"),
    )
    mongodb_database: str = Field(
        "cairn",
        pattern=r"^[A-Za-z0-9_-]+$",
        max_length=MAX_CAIRN_DATABASE_NAME,
        description="Cairn's own database; each tenant's records go to `<this>_t_<tenant>` (or `<this>_th_<hash>`), "
        "which MongoDB allows up to 63 bytes: hence at most 35 characters here",
    )
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "cairn"

    log_level: str = "INFO"
    log_format: str = Field("auto", pattern="^(auto|json|text)$")

    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(0, ge=0, le=65535, description="0: no metrics server")
    trace_exporter: str = Field("none", pattern="^(none|console|otlp|file)$")
    trace_file: str = "cairn-spans.jsonl"
    otlp_endpoint: str = "http://127.0.0.1:4318"

    publish_timeout_s: float = Field(10.0, gt=0)
