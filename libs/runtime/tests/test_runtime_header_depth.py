"""Header tables nested thousands of levels deep: both AMQP decoders end, bounded (header_depth.py).

The bytes are what RabbitMQ delivers in a content header; before the bound, py-amqp's and pamqp's
recursive decoders raised RecursionError in the connection's frame reader.
"""

import struct
from collections.abc import Callable

import amqp.serialization
import pytest
from pamqp import decode as pamqp_decode

from cairn_runtime.header_depth import MAX_DEPTH, TOO_DEEP, bound_header_depth

LEVELS = 20_000


def nested_table(levels: int, kind: bytes = b"F") -> bytes:
    """A field table (4-byte length, then entries) whose one key `k` holds a table (or an array
    holding a table) `levels` deep; the innermost holds `leaf`: 7. Built bottom-up."""
    content = b"\x04leafI" + struct.pack(">i", 7)
    for _ in range(levels):
        table = struct.pack(">I", len(content)) + content
        if kind == b"A":  # an array of one table
            element = b"F" + table
            content = b"\x01kA" + struct.pack(">I", len(element)) + element
        else:
            content = b"\x01kF" + table
    # A sibling after the deep value: the skip must land exactly on it.
    content += b"\x04nextS" + struct.pack(">I", 2) + b"ok"
    return struct.pack(">I", len(content)) + content


def depth_of(value: object) -> int:
    depth = 0
    while isinstance(value, list) or (isinstance(value, dict) and "k" in value):
        value = value["k"] if isinstance(value, dict) else value[0]
        depth += 1
    return depth


def decode_py_amqp(buf: bytes) -> tuple[int, dict]:
    (headers,), offset = amqp.serialization.loads("F", buf, 0)
    return offset, headers


def decode_pamqp(buf: bytes) -> tuple[int, dict]:
    return pamqp_decode.by_type(buf, "table")


@pytest.mark.parametrize("decode", [decode_py_amqp, decode_pamqp], ids=["py-amqp", "pamqp"])
@pytest.mark.parametrize("kind", [b"F", b"A"], ids=["tables", "arrays"])
def test_a_table_thousands_deep_is_decoded_to_a_bounded_depth(decode: Callable[[bytes], tuple[int, dict]], kind: bytes) -> None:
    bound_header_depth()
    buf = nested_table(LEVELS, kind)
    consumed, headers = decode(buf)
    assert consumed == len(buf) and headers["next"] == "ok"  # the skip lands on the sibling
    value = headers["k"]
    while isinstance(value, (dict, list)):
        value = value["k"] if isinstance(value, dict) else value[0]
    assert value == TOO_DEEP
    assert depth_of(headers) <= 2 * MAX_DEPTH + 1


def test_ordinary_nesting_is_decoded_whole() -> None:
    bound_header_depth()
    buf = nested_table(5)
    (headers,), _ = amqp.serialization.loads("F", buf, 0)
    _, same = pamqp_decode.by_type(buf, "table")
    assert headers == same and depth_of(headers) == 5 and headers["next"] == "ok"
    value = headers
    for _ in range(5):
        value = value["k"]
    assert value == {"leaf": 7}
