"""The pipeline catalog: what workers announce, and how a job's params are checked against it.

Pipelines are code installed in the workers (entry point group `cairn.pipelines`, see cairn_sdk).
At start-up each worker writes one catalog entry per pipeline it can run into the `pipelines`
collection: its name, version, description, params JSON Schema and work-space descriptors. The
gateway checks a job against the entry (`check_job`) and copies the resolved work space into the
job document, so neither the gateway nor the scheduler ever imports pipeline code.
"""

import json
from collections.abc import Callable
from datetime import date, datetime
from typing import Any
from uuid import UUID

from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import SchemaError as InvalidSchema
from jsonschema.exceptions import ValidationError as SchemaError
from pydantic import AnyUrl, BaseModel, ConfigDict, Field, TypeAdapter
from referencing.exceptions import Unresolvable

from cairn_contracts.jobs import MAX_ITEMS_PER_JOB, PIPELINE_NAME, LeaseFrontierSharding, lease_frontier_items
from cairn_contracts.namespaces import JOB_COLLECTION_SCHEMA, PIPELINES  # noqa: F401  (PIPELINES re-exported)
from cairn_sdk.space import SpaceError, resolve

# The pipelines shipped inside the worker (registered through its own entry points).
SYNTHETIC = "synthetic"
MONGO_RANGE = "mongo_range"
HTTP_JSON = "http_json"

# Work spaces whose interval length is the number of records to expect (keys, list items); a time
# window's is not known before it runs. The scheduler's `records_total`, the gateway's record quota.
COUNTED_SPACES = ("key_range", "work_items")


class CatalogEntry(BaseModel):
    """One `pipelines` document (`_id` = name). `space`: the descriptors in order (cairn_sdk
    `describe`). `announced_at_ms`: epoch ms of the latest announcement; `announced_by`: the worker."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str = Field(pattern=PIPELINE_NAME)
    version: str = "1"
    description: str = ""
    params_schema: dict[str, Any]
    space: list[dict[str, Any]]
    announced_at_ms: int = 0
    announced_by: str = ""


    @classmethod
    def from_document(cls, document: dict[str, Any]) -> "CatalogEntry":
        """The entry of a `pipelines` document (see `catalog_document`). Raises BrokenEntry: a
        document that is not one (bad JSON text, missing fields, a schema no JSON Schema)."""
        try:
            schema = json.loads(document["params_schema_json"])
            Draft202012Validator.check_schema(schema)  # with its format checker: a `pattern` must compile
            return cls.model_validate({**document, "name": document["_id"], "params_schema": schema})
        except (KeyError, TypeError, ValueError, InvalidSchema, RecursionError) as error:  # ValueError: JSON text, pydantic
            raise BrokenEntry(f"the catalog entry of {document.get('_id')!r} is unreadable: {type(error).__name__}") from error


class BrokenEntry(ValueError):
    """A `pipelines` document that is not a catalog entry (not written by `catalog_document`): the
    pipeline is treated as not announced, never as a server error."""


def catalog_document(entry: dict[str, Any], announced_by: str, now_ms: int) -> dict[str, Any]:
    """The `pipelines` document of a catalog entry (cairn_sdk `Pipeline.catalog_entry()`), without
    its `_id` (the name). The JSON Schema is kept as JSON text: its `$defs`/`$ref` keys are field
    names MongoDB refuses or mangles in stored documents."""
    return {
        "version": str(entry["version"]),
        "description": str(entry.get("description") or ""),
        "params_schema_json": json.dumps(entry["params_schema"], sort_keys=True),
        "space": entry["space"],
        "announced_at_ms": now_ms,
        "announced_by": announced_by,
    }


class CatalogRefusal(ValueError):
    """A job the catalog refuses; `errors` are field errors `{loc, msg, type, input?}` as a request
    validation error's (locations start with `at`, e.g. ["body", "params", "count"])."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors[0]["msg"] if errors else "refused")
        self.errors = errors


def unknown_pipeline(name: str, known: list[str], at: tuple[str | int, ...] = ("body",)) -> CatalogRefusal:
    """The refusal of a job naming a pipeline no worker announced, listing those announced."""
    listed = ", ".join(sorted(known)) or "none (no worker has announced its pipelines yet)"
    return CatalogRefusal(
        [{"loc": [*at, "pipeline"], "msg": f"no pipeline {name!r} is announced; known pipelines: {listed}", "type": "unknown_pipeline", "input": name}]
    )


def with_defaults(schema: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """`params` with the top-level defaults of its JSON Schema filled in where unset."""
    defaults = {name: prop["default"] for name, prop in schema.get("properties", {}).items() if isinstance(prop, dict) and "default" in prop}
    return {**defaults, **params}


# The `format`s a pipeline's Params schema carries (pydantic emits them), checked by the very
# pydantic types that emit them, in the worker's (lax, Python) mode, so a value that passes here
# is not refused later, and one the worker would parse is not refused here: jsonschema's own
# checks differ both ways (`20240101T000000Z` or `2024-W01-1` pass `datetime.fromisoformat` and
# fail pydantic; a URI with a space passes `urlsplit`). `uri` is AnyUrl's rule: a field typed
# HttpUrl emits the same format and still refuses other schemes at the worker.
PARAMS_FORMATS = FormatChecker(formats=("email", "ipv4", "ipv6", "regex"))
_PYDANTIC_FORMATS: dict[str, TypeAdapter[Any]] = {
    "date-time": TypeAdapter(datetime),
    "date": TypeAdapter(date),
    "uuid": TypeAdapter(UUID),
    "uri": TypeAdapter(AnyUrl),
}


def _parsed_by_pydantic(adapter: TypeAdapter[Any]) -> Callable[[object], bool]:
    def check(value: object) -> bool:
        if isinstance(value, str):
            adapter.validate_python(value)  # ValidationError (a ValueError): not in the format
        return True

    return check


for _format, _adapter in _PYDANTIC_FORMATS.items():
    PARAMS_FORMATS.checks(_format, raises=ValueError)(_parsed_by_pydantic(_adapter))


def params_errors(schema: dict[str, Any], params: dict[str, Any], at: tuple[str | int, ...]) -> list[dict[str, Any]]:
    """The field errors of `params` against the JSON Schema (`format` included: PARAMS_FORMATS),
    each located at the field itself."""
    validator = Draft202012Validator(schema, format_checker=PARAMS_FORMATS)
    return [_field_error(error, at) for error in sorted(validator.iter_errors(params), key=lambda e: list(e.absolute_path))]


def _field_error(error: SchemaError, at: tuple[str | int, ...]) -> dict[str, Any]:
    if error.validator in ("anyOf", "oneOf") and error.context:
        # An optional field (`anyOf: [{...}, {"type": "null"}]`): the error of the branch that
        # fits best (the deepest), e.g. ["fields", 0] rather than ["fields"].
        error = max(error.context, key=lambda sub: len(sub.absolute_path))
    loc: list[str | int] = [*at, *error.absolute_path]
    instance = error.instance
    if error.validator == "required" and isinstance(instance, dict):
        missing = [name for name in error.validator_value if name not in instance]
        return {"loc": loc + missing[:1], "msg": "Field required", "type": "missing"}
    if error.validator == "additionalProperties" and isinstance(instance, dict):
        known = set(error.schema.get("properties", {}))
        extra = [name for name in instance if name not in known]
        return {"loc": loc + extra[:1], "msg": "Extra inputs are not permitted", "type": "extra_forbidden"}
    message = error.message[:500]
    if error.validator == "not" and error.validator_value == JOB_COLLECTION_SCHEMA["not"]:
        message = f"{instance!r} is one of Cairn's own collections: no job may read or write it"
    field_error: dict[str, Any] = {"loc": loc, "msg": message, "type": str(error.validator)}
    if isinstance(instance, (str, int, float, bool)) or instance is None:
        field_error["input"] = instance
    return field_error


def check_job(entry: CatalogEntry, params: dict[str, Any], sharding: Any, at: tuple[str | int, ...] = ("body",)) -> dict[str, Any]:
    """The job's work space as the job document keeps it: the applicable descriptor with its
    interval, `{"kind": ..., <fields>, "start": int, "end": int}` (epoch ms for time ranges).

    Raises CatalogRefusal: params the schema refuses (located at ["body", "params", field]), no
    applicable or an empty interval, or a lease-frontier plan of more than MAX_ITEMS_PER_JOB items
    (located at ["body", "sharding", "item_size"]).
    """
    try:
        errors = params_errors(entry.params_schema, params, (*at, "params"))
    except (Unresolvable, RecursionError) as error:
        # The announced schema only breaks when applied: a `$ref` that resolves nowhere (never
        # fetched) or refers to itself. The job cannot be checked, so it is not accepted.
        msg = f"the announced params schema of {entry.name!r} cannot be applied ({type(error).__name__}): a worker must announce it again"
        raise CatalogRefusal([{"loc": [*at, "pipeline"], "msg": msg, "type": "broken_catalog_entry", "input": entry.name}]) from None
    if errors:
        raise CatalogRefusal(errors)
    try:
        interval = resolve(entry.space, with_defaults(entry.params_schema, params))
    except SpaceError as error:
        loc = [*at, "params", error.field] if error.field else [*at, "params"]
        raise CatalogRefusal([{"loc": loc, "msg": str(error), "type": "value_error"}]) from None
    if isinstance(sharding, LeaseFrontierSharding):
        items = lease_frontier_items((interval.start, interval.end), sharding.item_size)
        if items > MAX_ITEMS_PER_JOB:
            smallest = lease_frontier_items((interval.start, interval.end), MAX_ITEMS_PER_JOB)
            msg = (
                f"item_size {sharding.item_size} cuts the work space into {items} work items; a job plans at most "
                f"{MAX_ITEMS_PER_JOB}: make item_size at least {smallest} or the work space smaller"
            )
            raise CatalogRefusal([{"loc": [*at, "sharding", "item_size"], "msg": msg, "type": "too_many_items", "input": sharding.item_size}])
    return {**interval.space, "start": interval.start, "end": interval.end}
