"""Issue 11 item 1: a task message Celery cannot parse is dead-lettered once and the worker goes on.

A real Celery worker (the ingest worker's app and its DeadLetteringConsumer, solo pool, in a
thread) consumes a vhost of its own on the real RabbitMQ; poison messages are published raw to the
ingest queue, then an ordinary task. The dead letters are read back from the DLQ queue.
"""

import base64
import gzip
import json
import sys
import threading
import uuid
from typing import Any

import pytest
from celery.contrib.testing.worker import start_worker
from kombu import Connection, Exchange, Message, Producer

from cairn_contracts.messages import DeadLetter, OriginalMessage
from cairn_contracts.tasks import TASK_RUN_FRONTIER, TASK_RUN_SHARD
from cairn_contracts.topology import EXCHANGE_TASKS, QUEUE_DLQ, QUEUE_INGEST, ROUTING_INGEST
from cairn_ingest_worker.bootstrap import create_app
from cairn_ingest_worker.consumer import DeadLetteringConsumer, refuse_compression, stable_dead_letter_id
from cairn_ingest_worker.settings import WorkerSettings
from cairn_runtime.header_depth import TOO_DEEP
from cairn_testkit import fixtures

# Every shape of body a hostile or broken sender can put under a header naming run_shard.
POISON_BODIES: dict[str, tuple[bytes, str]] = {
    "array_of_four": (b"[1, 2, 3, 4]", "application/json"),
    "empty_array": (b"[]", "application/json"),
    "empty_object": (b"{}", "application/json"),
    "string": (b'"x"', "application/json"),
    "number": (b"42", "application/json"),
    "null": (b"null", "application/json"),
    "not_json": (b"\xff\xfe not json at all", "application/json"),
    "kwargs_not_an_object": (b'[[], "job_id", {}]', "application/json"),
    "positional_args": (b'[["j", "s"], {}, {}]', "application/json"),
    "embed_not_an_object": (b'[[], {"job_id": "j", "shard_key": "s"}, 7]', "application/json"),
    "huge": (b'[[], {"job_id": "' + b"x" * (3 * 1024 * 1024) + b'"}, {}]', "application/json"),
    "wrong_content_type": (b"<task/>", "application/xml"),
}


def publish_raw(amqp_url: str, body: bytes, content_type: str, headers: dict[str, Any]) -> None:
    with Connection(amqp_url) as connection:
        producer = Producer(connection.channel(), exchange=Exchange(EXCHANGE_TASKS, type="direct", passive=True))
        encoding = "utf-8" if content_type == "application/json" else "binary"
        producer.publish(
            body, routing_key=ROUTING_INGEST, headers=headers, content_type=content_type, content_encoding=encoding, retry=False
        )


def read_dead_letters(amqp_url: str) -> list[DeadLetter]:
    letters = []
    with Connection(amqp_url) as connection:
        queue = connection.SimpleQueue(QUEUE_DLQ, no_ack=True, queue_opts={"passive": True})
        try:
            while True:
                try:
                    message = queue.get(block=True, timeout=1)
                except queue.Empty:
                    return letters
                letters.append(DeadLetter.model_validate_json(message.body))
        finally:
            queue.close()


def test_every_unparseable_body_is_dead_lettered_once_and_the_worker_keeps_consuming(
    amqp_url: str, test_env: "fixtures.TestEnvironment"
) -> None:
    settings = WorkerSettings(amqp_url=amqp_url, mongodb_uri=test_env.mongodb_uri, mongodb_database=test_env.mongodb_database)
    app = create_app(settings)
    ran = threading.Event()

    @app.task(name="cairn.test.alive")
    def alive() -> None:
        ran.set()

    markers = {}
    for name, (body, content_type) in POISON_BODIES.items():
        markers[name] = task_id = f"poison-{name}-{uuid.uuid4().hex[:6]}"
        publish_raw(amqp_url, body, content_type, {"task": TASK_RUN_SHARD, "id": task_id, "lang": "py"})
    # Well-formed bodies under headers Cairn never sends: each would stop the worker or be held
    # past consumer_timeout (a per-message time limit the pool parses, an ETA a year ahead), or
    # re-send itself for ever (Celery's built-in chord_unlock).
    good_body = json.dumps([[], {"job_id": "j", "shard_key": "j:0000"}, {}]).encode()
    header_poison = {
        "timelimit": {"task": TASK_RUN_SHARD, "timelimit": ["x", "y"]},
        "far_eta": {"task": TASK_RUN_SHARD, "eta": "2099-01-01T00:00:00+00:00"},
        "expires": {"task": TASK_RUN_SHARD, "expires": "2099-01-01T00:00:00+00:00"},
        "chord_unlock": {"task": "celery.chord_unlock"},
        "callbacks": {"task": TASK_RUN_SHARD},
    }
    for name, headers in header_poison.items():
        markers[name] = task_id = f"poison-{name}-{uuid.uuid4().hex[:6]}"
        body = good_body if name != "callbacks" else json.dumps(
            [[], {"job_id": "j", "shard_key": "j:0000"}, {"callbacks": [{"task": "cairn.test.alive"}]}]
        ).encode()
        publish_raw(amqp_url, body, "application/json", {**headers, "id": task_id, "lang": "py"})
    # A zip bomb: 20 MB of zeros in 20 KB. kombu would inflate it before any guard saw it.
    bomb = gzip.compress(json.dumps([[], {"job_id": "0" * 20_000_000}, {}]).encode())
    markers["zip_bomb"] = task_id = f"poison-zip-bomb-{uuid.uuid4().hex[:6]}"
    publish_raw(amqp_url, bomb, "application/json", {"task": TASK_RUN_SHARD, "compression": "application/x-gzip", "id": task_id, "lang": "py"})
    # Headers nested 2,000 levels deep: py-amqp's decoder raised RecursionError in the worker's
    # frame reader, before any guard (encoding them needs a raised recursion limit, here only).
    deep: dict[str, Any] = {"leaf": 1}
    for _ in range(2_000):
        deep = {"k": deep}
    markers["deep_headers"] = task_id = f"poison-deep-{uuid.uuid4().hex[:6]}"
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)
    try:
        publish_raw(amqp_url, good_body, "application/json", {"id": task_id, "deep": deep})
    finally:
        sys.setrecursionlimit(limit)
    # A frontier task with no id header; then the same array body twice (a redelivery's twin).
    publish_raw(amqp_url, b"[[], {}, {}]", "application/json", {"task": TASK_RUN_FRONTIER})
    twin = {"task": TASK_RUN_SHARD, "id": f"twin-{uuid.uuid4().hex[:6]}", "lang": "py"}
    publish_raw(amqp_url, b"[1, 2, 3, 4]", "application/json", twin)
    publish_raw(amqp_url, b"[1, 2, 3, 4]", "application/json", twin)

    # shutdown_timeout bounds the worker thread's exit (seconds, usually well under one): 10 s was
    # passed once on a machine loaded by several test runs at once.
    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=60, queues=[QUEUE_INGEST]):
        app.send_task("cairn.test.alive", queue=QUEUE_INGEST)
        assert ran.wait(60), "the worker stopped consuming after the poison messages"
        # A well-formed task naming a shard that is not recorded, delivered twice (same task id).
        stray = {"job_id": f"no-such-job-{uuid.uuid4().hex[:6]}", "shard_key": "no-such-job:0000"}
        stray_id = f"stray-{uuid.uuid4().hex[:6]}"
        ran.clear()
        for _ in range(2):
            app.send_task(TASK_RUN_SHARD, kwargs=stray, task_id=stray_id)
        # A frontier runner of a job that is not recorded: before, it ended "drained", unrecorded.
        stray_lane = {"job_id": f"no-such-frontier-{uuid.uuid4().hex[:6]}", "lane": 0}
        for _ in range(2):
            app.send_task(TASK_RUN_FRONTIER, kwargs=stray_lane, task_id=f"{stray_id}-lane")
        app.send_task("cairn.test.alive", queue=QUEUE_INGEST)
        assert ran.wait(60)

    letters = read_dead_letters(amqp_url)
    lanes = [letter for letter in letters if letter.reason == "unknown_shard" and letter.job_id == stray_lane["job_id"]]
    assert len(lanes) == 2 and lanes[0].dead_letter_id == lanes[1].dead_letter_id and lanes[0].shard_key is None
    strays = [letter for letter in letters if letter.reason == "unknown_shard" and letter not in lanes]
    # Before: only a log line said the shard is not recorded.
    assert len(strays) == 2 and strays[0].dead_letter_id == strays[1].dead_letter_id
    assert strays[0].job_id == stray["job_id"] and strays[0].shard_key == stray["shard_key"]
    letters = [letter for letter in letters if letter.reason != "unknown_shard"]
    by_task_id = {letter.original.headers.get("id"): letter for letter in letters}
    for name, task_id in markers.items():
        letter = by_task_id.get(task_id)
        assert letter is not None, f"{name}: no dead letter ({[letter.original.headers.get('id') for letter in letters]})"
        assert letter.reason == "contract_violation" and letter.source_queue == QUEUE_INGEST, name
        assert letter.error_type == "UnreadableMessage", (name, letter.error_message)
    assert any(letter.original.headers.get("task") == TASK_RUN_FRONTIER and "id" not in letter.original.headers for letter in letters)
    assert "over the" in by_task_id[markers["huge"]].error_message
    # The bomb was never inflated: its dead letter holds the compressed bytes as they were sent.
    bombed = by_task_id[markers["zip_bomb"]]
    assert "is not inflated" in bombed.error_message
    assert TOO_DEEP in json.dumps(by_task_id[markers["deep_headers"]].original.headers, ensure_ascii=False)
    assert bombed.original.body_encoding == "base64" and base64.b64decode(bombed.original.body) == bomb
    # The twins are one message delivered twice: one dead-letter id, so one task_errors entry.
    twins = [letter for letter in letters if letter.original.headers.get("id") == twin["id"]]
    assert len(twins) == 2 and twins[0].dead_letter_id == twins[1].dead_letter_id
    assert len({letter.dead_letter_id for letter in letters}) == len(letters) - 1


# --- the guard, unit by unit -----------------------------------------------------------------------


def test_the_dead_letter_id_is_the_same_for_every_delivery_of_a_message() -> None:
    original = OriginalMessage(body="[1,2,3,4]", headers={"task": TASK_RUN_SHARD, "id": "t1"}, routing_key="ingest")
    redelivered = OriginalMessage(
        body="[1,2,3,4]", headers={"id": "t1", "task": TASK_RUN_SHARD, "x-delivery-count": 1}, routing_key="ingest"
    )
    other = OriginalMessage(body="[1,2,3]", headers={"task": TASK_RUN_SHARD, "id": "t1"}, routing_key="ingest")
    assert stable_dead_letter_id(original) == stable_dead_letter_id(redelivered)
    assert stable_dead_letter_id(original) != stable_dead_letter_id(other)
    assert stable_dead_letter_id(original) != stable_dead_letter_id(original, "unknown_shard")


def test_the_headers_cairn_itself_sends_pass_the_guard() -> None:
    consumer = object.__new__(DeadLetteringConsumer)
    consumer.app = type("App", (), {"conf": {"cairn_max_task_body_bytes": 4096, "task_time_limit": 750}})()
    for extra in ({"timelimit": [None, None]}, {"timelimit": [750.0, 720.0]}, {"eta": "2026-01-01T00:00:00+00:00", "retries": 3}):
        message = Message(body=b'[[], {"job_id": "j", "shard_key": "j:0"}, {}]', headers={"task": TASK_RUN_SHARD, "id": "t", **extra}, content_type="application/json")
        assert consumer._shape_problem(message) is None, extra


def test_a_compressed_body_is_kept_as_sent_and_named_by_the_guard() -> None:
    refuse_compression()
    bomb = gzip.compress(b"[[], {}, {}]" + b" " * 10_000_000)
    message = Message(body=bomb, headers={"task": TASK_RUN_SHARD, "id": "t", "compression": "gzip"}, content_type="application/json")
    assert message.body == bomb and message.errors  # not inflated: kombu records the refusal
    consumer = object.__new__(DeadLetteringConsumer)
    consumer.app = type("App", (), {"conf": {"cairn_max_task_body_bytes": 4096, "task_time_limit": 750}})()
    assert "header `compression`" in (consumer._shape_problem(message) or "")


@pytest.mark.parametrize(
    ("body", "headers", "problem"),
    [
        (b"[1, 2, 3, 4]", {"id": "t"}, "not [args, kwargs, embed]"),
        (b"{}", {"id": "t"}, "not [args, kwargs, embed]"),
        (b"[[1], {}, {}]", {"id": "t"}, "positional args"),
        (b'[[], "x", {}]', {"id": "t"}, "kwargs is a str"),
        (b"[[], {}, []]", {"id": "t"}, "embed is a list"),
        (b"[[], {}, {}]", {}, "header `id`"),
        (b"\xff{", {"id": "t"}, "cannot be decoded"),
        (b"[[], {}, {}]" + b" " * 5000, {"id": "t"}, "over the 4096-byte limit"),
        (b"[[], {}, {}]", {"id": "t", "timelimit": ["x", "y"]}, "header `timelimit`"),
        (b"[[], {}, {}]", {"id": "t", "timelimit": [-1, -1]}, "header `timelimit`"),
        (b"[[], {}, {}]", {"id": "t", "timelimit": [10_000, None]}, "header `timelimit`"),
        (b"[[], {}, {}]", {"id": "t", "eta": "2099-01-01T00:00:00+00:00"}, "header `eta`"),
        (b"[[], {}, {}]", {"id": "t", "eta": "soon"}, "header `eta`"),
        (b"[[], {}, {}]", {"id": "t", "expires": 10}, "header `expires`"),
        (b"[[], {}, {}]", {"id": "t", "compression": "application/x-gzip"}, "header `compression`"),
        (b"[[], {}, {}]", {"id": "t", "retries": "many"}, "header `retries`"),
        (b'[[], {}, {"chain": [{"task": "x"}]}]', {"id": "t"}, "links other tasks"),
        (b"[[], {}, {}]", {"id": "t", "task": "celery.chord_unlock"}, "not a Cairn task"),
        (b'{"task": "cairn.ingest.run_shard", "args": [1]}', {"id": "t", "task": None}, "not a Cairn task"),
    ],
)
def test_a_cairn_task_message_of_the_wrong_shape_is_named_as_such(body: bytes, headers: dict, problem: str) -> None:
    consumer = object.__new__(DeadLetteringConsumer)
    consumer.app = type("App", (), {"conf": {"cairn_max_task_body_bytes": 4096, "task_time_limit": 750}})()
    message = Message(body=body, headers={"task": TASK_RUN_SHARD, **headers}, content_type="application/json")
    assert problem in (consumer._shape_problem(message) or "")
    good = json.dumps([[], {"job_id": "j", "shard_key": "s"}, {}]).encode()
    as_json = {"content_type": "application/json"}
    assert consumer._shape_problem(Message(body=good, headers={"task": TASK_RUN_SHARD, "id": "t"}, **as_json)) is None
    # Other tasks' messages are left to Celery (and the guard around it).
    assert consumer._shape_problem(Message(body=body, headers={"task": "other", "id": "t"}, **as_json)) is None
