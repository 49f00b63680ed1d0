"""The store's own limit for scenario 1: two client processes (as many as the workers compared)
inserting the same records with unordered `insert_many` of 1,000, nothing else: no broker, no
tasks, no bookkeeping. Throughput at least 0.9x this is the issue's goal for Cairn.

`python -m bench.baseline.store_limit URI DATABASE COLLECTION KEY_PREFIX START END RECORD_SIZE`
inserts records [START, END) and prints how many it stored.
"""

import sys

from pymongo import MongoClient

from bench.baseline.celery_records import clean, filler, make_record

BATCH = 1000


def insert_range(uri: str, database: str, collection: str, key_prefix: str, start: int, end: int, record_size: int) -> int:
    fill = filler(record_size)
    client: MongoClient = MongoClient(uri, serverSelectionTimeoutMS=5000)
    target = client[database][collection]
    stored = 0
    try:
        for first in range(start, end, BATCH):
            batch = [clean(make_record(key_prefix, i, fill), "store-limit") for i in range(first, min(end, first + BATCH))]
            stored += len(target.insert_many(batch, ordered=False).inserted_ids)
    finally:
        client.close()
    return stored


if __name__ == "__main__":
    uri, database, collection, prefix, start, end, size = sys.argv[1:8]
    sys.stdout.write(f"{insert_range(uri, database, collection, prefix, int(start), int(end), int(size))}\n")
