"""The pipelines a job may name, each with the parameters it accepts.

Clients choose a pipeline by name from this closed set (no client-supplied import paths); the
ingest worker holds the implementation registered under the same name.
"""

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, model_validator

from cairn_contracts.bounds import ContractModel
from cairn_contracts.namespaces import JobCollection

SYNTHETIC = "synthetic"
MONGO_RANGE = "mongo_range"

FailureKind = Literal["non_retryable", "retryable", "crash"]

# Keys are stored as MongoDB 64-bit integers: a larger number could never be recorded, so it is
# refused as the client's error (422 on the field), not found out at the insert (500).
MAX_KEY = 2**62


class _Params(ContractModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def key_range(self) -> tuple[int, int]:
        """The half-open key range [start, end) that range sharding splits."""
        raise NotImplementedError


class SyntheticParams(_Params):
    """Deterministic generated records: record i of a job is the same on every run."""

    start: int = Field(0, ge=0, le=MAX_KEY, description="First record key")
    count: int = Field(..., ge=1, le=1_000_000_000, description="Number of records")
    record_size: int = Field(100, ge=1, le=1_048_576, description="Bytes of payload per record")
    delay_ms_per_record: float = Field(0, ge=0, le=10_000, description="Simulated work per record")
    key_prefix: str = Field("syn", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    fail_at_key: int | None = Field(None, ge=0, le=MAX_KEY, description="Inject a failure when reaching this key")
    failure: FailureKind = Field("non_retryable", description="What the injected failure does")
    fail_times: int | None = Field(
        None, ge=1, le=1_000_000, description="Fail only on the first N attempts of the shard (default: always)"
    )
    def key_range(self) -> tuple[int, int]:
        return self.start, self.start + self.count

    def record_key(self, index: int) -> str:
        return f"{self.key_prefix}-{index:012d}"


# A document field path: no `$` operator, no NUL (MongoDB refuses both in projections).
FIELD_NAME = r"^[A-Za-z_][A-Za-z0-9_.]{0,63}$"


class MongoRangeParams(_Params):
    """Copies documents of a source collection whose integer key lies in [start, end)."""

    collection: JobCollection = Field(..., pattern=r"^[A-Za-z0-9_.-]{1,120}$", description="Source collection; none of Cairn's own")
    key_field: str = Field("_id", pattern=FIELD_NAME)
    start: int = Field(..., ge=-MAX_KEY, le=MAX_KEY)
    end: int = Field(..., ge=-MAX_KEY, le=MAX_KEY)
    fields: list[Annotated[str, Field(pattern=FIELD_NAME)]] | None = Field(
        None, max_length=100, description="Fields to copy (all if unset)"
    )

    @model_validator(mode="after")
    def _end_after_start(self) -> "MongoRangeParams":
        if self.end <= self.start:
            raise ValueError("end must be greater than start")
        return self

    def key_range(self) -> tuple[int, int]:
        return self.start, self.end


PIPELINE_NAMES = (SYNTHETIC, MONGO_RANGE)
