"""The job specification a client submits and every service reads."""

import math
from typing import Annotated, Any, Literal

from pydantic import (
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from cairn_contracts.bounds import ContractModel, check_storable, has_surrogate
from cairn_contracts.namespaces import JobCollection
from cairn_contracts.sinks import WriteMode
from cairn_contracts.states import Priority
from cairn_contracts.webhooks import CallbackUrl

# A pipeline name: also an entry point name and a label of metrics.
PIPELINE_NAME = r"^[a-z][a-z0-9_]{0,62}$"

# --- workflows: dependencies (`after`) and params from the previous job (`params_from`) ----------
# What `params_from` reads of a job's first dependency (`after[0]`; in a chain, the previous step):
# its id, name, pipeline, final state, params, target collection, records total and result
# (records_written, records_done, ...). README "Workflows" documents them.
DEPENDENCY_FIELDS = ("job_id", "name", "pipeline", "state", "params", "target_collection", "records_total", "result")
MAX_DEPENDENCIES = 100
# A dependency (or a chain's step) not recorded within this long after its dependent (or its
# chain) was never going to be: the gateway that recorded them died part-way (epoch ms).
MISSING_DEPENDENCY_GRACE_MS = 60_000
MAX_CHAIN_STEPS = 50
JobRef = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
# A param to fill, as a dotted path into `params` (`count`, `source.collection`).
ParamPath = Annotated[str, Field(max_length=200, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}(\.[A-Za-z_][A-Za-z0-9_]{0,63}){0,7}$")]
# Where its value comes from: a dotted path into the dependency's view (list items by index).
SourcePath = Annotated[
    str, Field(max_length=300, pattern=rf"^({'|'.join(DEPENDENCY_FIELDS)})(\.[A-Za-z0-9_]{{1,64}}){{0,8}}$")
]
# What a job whose dependency did not succeed does: `fail` (it ends FAILURE), `skip` (it ends
# CANCELLED without running), `run` (it starts once every dependency has finished, however).
DependencyFailurePolicy = Literal["fail", "skip", "run"]


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
    """How many work items a lease-frontier plan cuts [start, end) into (checked against
    MAX_ITEMS_PER_JOB by cairn_contracts.pipelines.check_job, where the work space is known)."""
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


class JobSpec(ContractModel):
    """A job: which pipeline runs, with which params, sharded how, stored where.

    `params` is checked against the pipeline's announced JSON Schema (the catalog,
    cairn_contracts.pipelines), not here: the pipelines are plug-ins this model does not know.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(None, max_length=200, description="Free text to find the job by")
    pipeline: str = Field(..., pattern=PIPELINE_NAME, description="A pipeline of the catalog (GET /v1/pipelines)")
    params: dict[str, Any] = Field(default_factory=dict, description="The pipeline's params, checked against its announced JSON Schema")
    sharding: Sharding = Field(default_factory=RangeSharding)
    priority: Priority = Priority.NORMAL
    batch_size: int = Field(1000, ge=1, le=50_000, description="Records per stored batch and checkpoint")
    target_collection: JobCollection = Field(
        "records",
        pattern=r"^[A-Za-z][A-Za-z0-9_]{0,63}$",
        description="Collection the records go to; none of Cairn's own (jobs, shards, api_keys...)",
    )
    write_mode: WriteMode = Field("insert", description="insert (first write wins), upsert (by identity, latest wins), replace_window")
    window: str | None = Field(None, max_length=200, description="replace_window: the scope key of the records replaced (default derived)")
    retry: RetryPolicy | None = Field(None, description="Retry policy of this job (default: the pipeline's, then the worker's)")
    callback_url: CallbackUrl | None = Field(
        None,
        description="http(s) URL POSTed a signed JSON body (Cairn-Signature header) once the job is finished; see README Webhooks",
        examples=["https://example.com/hooks/cairn"],
    )
    after: list[JobRef] = Field(
        default_factory=list,
        max_length=MAX_DEPENDENCIES,
        description="Ids of the tenant's jobs this job waits for (state WAITING): it starts once all of them SUCCEEDED; see README Workflows",
    )
    on_dependency_failure: DependencyFailurePolicy = Field(
        "fail",
        description="A dependency ended FAILURE or CANCELLED: `fail` (this job ends FAILURE), `skip` (CANCELLED, never run), `run` (start anyway once all finished)",
    )
    params_from: dict[ParamPath, SourcePath] = Field(
        default_factory=dict,
        max_length=50,
        description="Params filled when the job is released, from its first dependency (after[0]; in a chain the previous step): "
        "{param path: path in that job}, e.g. {\"count\": \"result.records_written\"}",
        examples=[{"count": "result.records_written", "collection": "target_collection"}],
    )

    @field_validator("*", mode="after")
    @classmethod
    def _storable_text(cls, value: Any, info: ValidationInfo) -> Any:  # type: ignore[override]  # replaces the base validator (same name)
        # `params` is checked value by value below, so the error names the value's own location.
        return value if info.field_name == "params" else check_storable(value)

    @model_validator(mode="after")
    def _storable_params(self) -> "JobSpec":
        """Params MongoDB can store and a JSON Schema can compare: no lone surrogate in any text
        (keys included), no NaN or infinity; the error is located at the value (["params", ...])."""
        errors = [
            InitErrorDetails(type=PydanticCustomError("unstorable", message), loc=("params", *path), input=value)
            for path, value, message in unstorable(self.params)
        ]
        if errors:
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self


    @model_validator(mode="after")
    def _dependencies_once(self) -> "JobSpec":
        seen: set[str] = set()
        for index, job_id in enumerate(self.after):
            if job_id in seen:
                error = PydanticCustomError("duplicate_dependency", "job {job_id} is named twice", {"job_id": job_id})
                raise ValidationError.from_exception_data(type(self).__name__, [InitErrorDetails(type=error, loc=("after", index), input=job_id)])
            seen.add(job_id)
        return self

    @model_validator(mode="after")
    def _window_needs_replace_window(self) -> "JobSpec":
        if self.window is not None and self.write_mode != "replace_window":
            error = PydanticCustomError("window_without_replace_window", "window applies to write_mode replace_window only")
            raise ValidationError.from_exception_data(
                type(self).__name__, [InitErrorDetails(type=error, loc=("window",), input=self.window)]
            )
        return self


def unstorable(value: Any, path: tuple[str | int, ...] = ()) -> list[tuple[tuple[str | int, ...], Any, str]]:
    """(location, value, why) of every value in a JSON value that cannot be stored or compared."""
    if isinstance(value, float) and not math.isfinite(value):
        return [(path, str(value), "NaN and infinity are not numbers a field can mean")]
    if isinstance(value, str):
        return [(path, value.encode("utf-8", "backslashreplace").decode(), "text holds a lone UTF-16 surrogate")] if has_surrogate(value) else []
    found: list[tuple[tuple[str | int, ...], Any, str]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and has_surrogate(key):
                found.append(((*path, key.encode("utf-8", "backslashreplace").decode()), key, "a key holds a lone UTF-16 surrogate"))
            else:
                found.extend(unstorable(item, (*path, key)))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found.extend(unstorable(item, (*path, index)))
    return found


# The one validator/serializer of a JobSpec (kept from when it was a union): a stored spec dict ->
# JobSpec; raises pydantic.ValidationError.
JOB_SPEC_ADAPTER: TypeAdapter[Any] = TypeAdapter(JobSpec)
