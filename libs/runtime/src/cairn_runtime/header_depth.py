"""AMQP header tables decoded to a bounded depth, in both client libraries Cairn uses.

A field table may hold tables to any depth, and both decoders recurse once per level: py-amqp
(Celery, kombu: the worker, the gateway's remote control) and pamqp (aio-pika: the asyncio
services). A message whose headers nest a thousand levels deep made them raise `RecursionError`
inside the connection's frame reader, before any Cairn code saw the message: the consumer
stopped, again on every redelivery. `bound_header_depth()` wraps the table and array decoders of
both: past `MAX_DEPTH` levels a nested table or array is skipped whole (its length prefix says
how far) and stands as `TOO_DEEP`, so the message arrives and Cairn's guards handle it (a task
message naming no task is dead-lettered; a contract message fails its model).

The libraries have no hook for this: the wrappers replace py-amqp's `_read_item` and pamqp's
`TABLE_MAPPING` entries for tables and arrays, the functions the decoders look up at each level.
"""

import struct
import threading
from collections.abc import Callable
from typing import Any

import amqp.serialization
from pamqp import decode as pamqp_decode

# Cairn's own headers nest three levels at most (x-death: a list of tables holding lists).
MAX_DEPTH = 32
TOO_DEEP = "…(nested too deep to decode)"

_LENGTH = struct.Struct(">I")
_state = threading.local()  # each connection decodes its frames in one thread at a time
_installed = threading.Lock()


def _depth() -> int:
    return getattr(_state, "depth", 0)


def _bounded_py_amqp(read_item: Callable[[Any, int], tuple[Any, int]]) -> Callable[[Any, int], tuple[Any, int]]:
    def read_bounded(buf: Any, offset: int) -> tuple[Any, int]:
        if bytes(buf[offset : offset + 1]) not in (b"F", b"A"):
            return read_item(buf, offset)
        if _depth() >= MAX_DEPTH:
            (length,) = _LENGTH.unpack_from(buf, offset + 1)
            return TOO_DEEP, offset + 1 + _LENGTH.size + length
        _state.depth = _depth() + 1
        try:
            return read_item(buf, offset)
        finally:
            _state.depth -= 1

    read_bounded.cairn_bounded = True  # type: ignore[attr-defined]
    return read_bounded


def _bounded_pamqp(decoder: Callable[[bytes], tuple[int, Any]]) -> Callable[[bytes], tuple[int, Any]]:
    def decode_bounded(value: bytes) -> tuple[int, Any]:
        if _depth() >= MAX_DEPTH:
            try:
                (length,) = _LENGTH.unpack_from(value, 0)
            except struct.error as error:
                raise ValueError("Could not unpack data") from error  # what pamqp raises itself
            return _LENGTH.size + length, TOO_DEEP
        _state.depth = _depth() + 1
        try:
            return decoder(value)
        finally:
            _state.depth -= 1

    decode_bounded.cairn_bounded = True  # type: ignore[attr-defined]
    return decode_bounded


def bound_header_depth() -> None:
    """Install the bounded decoders in this process (idempotent; before any connection reads)."""
    with _installed:
        if not getattr(amqp.serialization._read_item, "cairn_bounded", False):
            amqp.serialization._read_item = _bounded_py_amqp(amqp.serialization._read_item)
        for kind in (b"F", b"A"):
            decoder = pamqp_decode.TABLE_MAPPING[kind]
            if not getattr(decoder, "cairn_bounded", False):
                pamqp_decode.TABLE_MAPPING[kind] = _bounded_pamqp(decoder)
