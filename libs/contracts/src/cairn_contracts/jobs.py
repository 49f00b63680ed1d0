"""The job specification a client submits and every service reads."""

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from cairn_contracts.bounds import ContractModel
from cairn_contracts.namespaces import JobCollection
from cairn_contracts.pipelines import MongoRangeParams, SyntheticParams
from cairn_contracts.states import Priority
from cairn_contracts.webhooks import CallbackUrl


class RangeSharding(ContractModel):
    """Split the pipeline's key range into `shards` contiguous, near-equal ranges, one task each."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Literal["range"] = "range"
    shards: int = Field(1, ge=1, le=1024)


class HashModSharding(ContractModel):
    """`shards` buckets: a record belongs to bucket `stable_hash(key) % shards`; one task per
    bucket, each scanning the whole key range with its own cursor and keeping its own records."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Literal["hash_mod"] = "hash_mod"
    shards: int = Field(..., ge=1, le=1024)


class LeaseFrontierSharding(ContractModel):
    """The key range cut into work items of `item_size` keys kept in the shards collection;
    `shards` runner tasks pull items one at a time by lease until none is left."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Literal["lease_frontier"] = "lease_frontier"
    shards: int = Field(..., ge=1, le=256, description="Runner tasks pulling items in parallel")
    item_size: int = Field(10_000, ge=1, le=1_000_000_000, description="Keys per work item")


SHARDING_STRATEGIES = ("range", "hash_mod", "lease_frontier")

# The most shards or work items one job may plan. Every item is two documents (shard and
# checkpoint) that the scheduler writes, the roll-up counts and the status reads, so a job's plan
# must stay bounded whatever its key range: a larger range takes a larger `item_size`. Range and
# hash-mod plans are bounded by `shards` (at most 1024) already.
MAX_ITEMS_PER_JOB = 10_000


def lease_frontier_items(key_range: tuple[int, int], item_size: int) -> int:
    """How many work items a lease-frontier plan cuts [start, end) into."""
    start, end = key_range
    return -(-(end - start) // item_size)  # integer ceiling: keys reach 2^63, beyond a float's precision


def strategy(value: Any) -> str | None:
    """The sharding strategy named by a spec; `range` when the client names none."""
    if isinstance(value, dict):
        return value.get("strategy", "range")
    return getattr(value, "strategy", None)


Sharding = Annotated[
    Annotated[RangeSharding, Tag("range")] | Annotated[HashModSharding, Tag("hash_mod")] | Annotated[LeaseFrontierSharding, Tag("lease_frontier")],
    Discriminator(strategy),
]


class RetryPolicy(ContractModel):
    """How often and how patiently a shard's retryable failures are retried.

    Any field left out falls back to the pipeline's declared default, then to the worker's
    settings (`CAIRN_MAX_ATTEMPTS`, `CAIRN_RETRY_BASE_DELAY_S`, `CAIRN_RETRY_MAX_DELAY_S`). The
    delay before retry n is uniform in [0, min(max_delay_s, base_delay_s * 2^(n-1))].
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_attempts: int | None = Field(None, ge=1, le=100, description="Attempts before the shard is dead-lettered")
    base_delay_s: float | None = Field(None, ge=0, le=3600, description="Backoff ceiling of the first retry")
    max_delay_s: float | None = Field(None, ge=0, le=86_400, description="Largest backoff ceiling")

    @model_validator(mode="after")
    def _max_not_below_base(self) -> "RetryPolicy":
        if self.base_delay_s is not None and self.max_delay_s is not None and self.max_delay_s < self.base_delay_s:
            raise ValueError("max_delay_s must not be below base_delay_s")
        return self


class _JobSpecBase(ContractModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(None, max_length=200, description="Free text to find the job by")
    sharding: Sharding = Field(default_factory=RangeSharding)
    priority: Priority = Priority.NORMAL
    batch_size: int = Field(1000, ge=1, le=50_000, description="Records per stored batch and checkpoint")
    target_collection: JobCollection = Field(
        "records",
        pattern=r"^[A-Za-z][A-Za-z0-9_]{0,63}$",
        description="Collection the records go to; none of Cairn's own (jobs, shards, api_keys...)",
    )
    retry: RetryPolicy | None = Field(None, description="Retry policy of this job (default: the pipeline's, then the worker's)")
    callback_url: CallbackUrl | None = Field(
        None,
        description="http(s) URL POSTed a signed JSON body (Cairn-Signature header) once the job is finished; see README Webhooks",
        examples=["https://example.com/hooks/cairn"],
    )

    @model_validator(mode="after")
    def _plan_is_bounded(self) -> "_JobSpecBase":
        """At most MAX_ITEMS_PER_JOB lease-frontier items; the error names `sharding.item_size`."""
        sharding, params = self.sharding, getattr(self, "params", None)
        if not isinstance(sharding, LeaseFrontierSharding) or params is None:
            return self
        key_range = params.key_range()
        items = lease_frontier_items(key_range, sharding.item_size)
        if items <= MAX_ITEMS_PER_JOB:
            return self
        smallest = lease_frontier_items(key_range, MAX_ITEMS_PER_JOB)  # the item_size giving exactly the maximum
        error = PydanticCustomError(
            "too_many_items",
            "item_size {item_size} cuts the key range into {items} work items; a job plans at most "
            "{max_items}: make item_size at least {smallest} or the key range smaller",
            {"item_size": sharding.item_size, "items": items, "max_items": MAX_ITEMS_PER_JOB, "smallest": smallest},
        )
        # A ValidationError raised here keeps its own location, so the 422 names the field at fault
        # (["body", "sharding", "item_size"]) instead of the whole spec.
        raise ValidationError.from_exception_data(
            type(self).__name__,
            [InitErrorDetails(type=error, loc=("sharding", "item_size"), input=sharding.item_size)],
        )


class SyntheticJobSpec(_JobSpecBase):
    pipeline: Literal["synthetic"] = "synthetic"  # SYNTHETIC
    params: SyntheticParams


class MongoRangeJobSpec(_JobSpecBase):
    pipeline: Literal["mongo_range"] = "mongo_range"  # MONGO_RANGE
    params: MongoRangeParams


JobSpec = Annotated[SyntheticJobSpec | MongoRangeJobSpec, Field(discriminator="pipeline")]

# The one validator/serializer of a JobSpec (an annotated union has no model_validate): a stored
# spec dict -> SyntheticJobSpec | MongoRangeJobSpec; raises pydantic.ValidationError.
JOB_SPEC_ADAPTER: TypeAdapter[Any] = TypeAdapter(JobSpec)
