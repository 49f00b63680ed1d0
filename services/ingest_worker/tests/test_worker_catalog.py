"""The worker's catalog announcement: one `pipelines` document per installed pipeline, written
without an upsert (the stand-in drops $setOnInsert), the same however often a worker starts."""

from cairn_contracts.pipelines import PIPELINES, CatalogEntry
from cairn_ingest_worker.catalog import announce_catalog
from cairn_ingest_worker.pipelines import catalog


def test_the_catalog_is_announced_and_announcing_again_replaces_it(db) -> None:
    entries = catalog()

    assert announce_catalog(db[PIPELINES], entries, "worker-a") == len(entries)
    assert announce_catalog(db[PIPELINES], entries, "worker-b") == len(entries)

    documents = {d["_id"]: d for d in db[PIPELINES].find({})}
    assert set(documents) == {e["name"] for e in entries} >= {"synthetic", "mongo_range"}
    assert {d["announced_by"] for d in documents.values()} == {"worker-b"}
    synthetic = CatalogEntry.from_document(documents["synthetic"])
    assert synthetic.params_schema == next(e for e in entries if e["name"] == "synthetic")["params_schema"]
    assert synthetic.space[0]["kind"] == "key_range" and synthetic.version == "2"


def test_a_new_version_of_a_pipeline_replaces_the_announced_one(db) -> None:
    [entry] = [e for e in catalog() if e["name"] == "synthetic"]
    announce_catalog(db[PIPELINES], [entry], "old-worker")

    announce_catalog(db[PIPELINES], [{**entry, "version": "3", "description": "newer"}], "new-worker")

    stored = CatalogEntry.from_document(db[PIPELINES].find_one({"_id": "synthetic"}))
    assert (stored.version, stored.description, stored.announced_by) == ("3", "newer", "new-worker")
