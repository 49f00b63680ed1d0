"""The job specification a client submits and every service reads."""

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from cairn_contracts.pipelines import MONGO_RANGE, SYNTHETIC, MongoRangeParams, SyntheticParams
from cairn_contracts.states import Priority


class RangeSharding(BaseModel):
    """Split the pipeline's key range into `shards` contiguous, near-equal ranges."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Literal["range"] = "range"
    shards: int = Field(1, ge=1, le=1024)


SHARDING_STRATEGIES = ("range",)


def strategy(value: Any) -> str | None:
    """The sharding strategy named by a spec; `range` when the client names none."""
    if isinstance(value, dict):
        return value.get("strategy", "range")
    return getattr(value, "strategy", None)


Sharding = Annotated[Union[Annotated[RangeSharding, Tag("range")]], Discriminator(strategy)]


class _JobSpecBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(None, max_length=200, description="Free text to find the job by")
    sharding: Sharding = Field(default_factory=RangeSharding)
    priority: Priority = Priority.NORMAL
    batch_size: int = Field(1000, ge=1, le=50_000, description="Records per stored batch and checkpoint")
    target_collection: str = Field(
        "records", pattern=r"^[A-Za-z][A-Za-z0-9_]{0,63}$", description="Collection the records go to"
    )


class SyntheticJobSpec(_JobSpecBase):
    pipeline: Literal["synthetic"] = SYNTHETIC
    params: SyntheticParams


class MongoRangeJobSpec(_JobSpecBase):
    pipeline: Literal["mongo_range"] = MONGO_RANGE
    params: MongoRangeParams


JobSpec = Annotated[Union[SyntheticJobSpec, MongoRangeJobSpec], Field(discriminator="pipeline")]
