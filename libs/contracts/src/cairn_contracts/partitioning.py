"""The stable hash that assigns a record to a hash-mod bucket.

Python's built-in `hash()` is salted per process, so it cannot decide which worker owns a record;
this one gives every process, on every machine, the same answer.
"""

import hashlib


def stable_hash(key: str | int) -> int:
    digest = hashlib.blake2b(str(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def bucket_of(key: str | int, buckets: int) -> int:
    return stable_hash(key) % buckets
