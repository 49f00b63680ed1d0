"""The pipeline catalog for tests that submit or plan jobs without a worker running.

A worker announces its pipelines at start-up (the `pipelines` collection); a test of the gateway
or the scheduler alone seeds the same documents here, from the worker's own built-in pipelines
(or the entries given), written the way the worker writes them.
"""

from typing import Any

from cairn_contracts.pipelines import PIPELINES, catalog_document


def builtin_entries() -> list[dict[str, Any]]:
    """The catalog entries of every pipeline installed in this environment (entry points)."""
    from cairn_ingest_worker.pipelines import catalog  # the worker is a dev dependency of the tests only

    return catalog()


def catalog_documents(entries: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    return [{"_id": e["name"], **catalog_document(e, "cairn-testkit", 0)} for e in (entries if entries is not None else builtin_entries())]


def seed_catalog(db: Any, entries: list[dict[str, Any]] | None = None) -> None:
    """Write the catalog (default: the installed pipelines) into `db` (a pymongo Database), replacing it."""
    db[PIPELINES].delete_many({})
    db[PIPELINES].insert_many(catalog_documents(entries))


async def seed_catalog_async(db: Any, entries: list[dict[str, Any]] | None = None) -> None:
    """`seed_catalog` for an AsyncDatabase."""
    await db[PIPELINES].delete_many({})
    await db[PIPELINES].insert_many(catalog_documents(entries))
