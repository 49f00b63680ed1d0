import os
import socket

from pydantic import Field

from cairn_runtime.settings import ServiceSettings


class WorkerSettings(ServiceSettings):
    service_name: str = "ingest-worker"
    worker_concurrency: int = Field(2, ge=1, le=64)
    worker_id: str = Field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    lease_ttl_s: float = Field(30.0, gt=0, description="A lease not renewed for this long may be taken over")
    heartbeat_interval_s: float = Field(5.0, gt=0)
    task_slice_s: float = Field(
        600.0, gt=0, description="Longest run of one task delivery; well under RabbitMQ's consumer_timeout (30 min)"
    )
    max_attempts: int = Field(5, ge=1, description="Attempts of a shard before it is dead-lettered")
    retry_base_delay_s: float = Field(1.0, ge=0)
    retry_max_delay_s: float = Field(60.0, ge=0)
    source_database: str | None = Field(None, description="Database of mongo_range sources (default: Cairn's)")
    # BENCHMARK ONLY (`make bench`, scenario 2): skip the checkpoint of every batch but a shard's
    # last, to measure what checkpointing costs. A crash then redoes the whole shard. Never set it.
    bench_disable_checkpoints: bool = False
