"""Nothing pushed onto a queue stops a worker: each entry kombu or Celery cannot take is
dead-lettered (raw bytes, reason, queue) and each malformed envelope that names a job is
answered with a typed error naming the job and the field. A real worker process, raw
LPUSHes; the worker keeps its PID, and a good job still equals the in-process answer."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import redis

from hetbatch.producers import Client, RemoteError
from hetbatch.producers.protocol.keys import Keys, lane_list
from hetbatch.producers.protocol.kombu import celery_message, priority_list
from hetbatch.producers.protocol.wire import FUSE_TASK_NAME, TASK_NAME, decode_pack_result, decode_result, encode_table
from hetbatch.worker.ops.dlq import DeadLetters
from tests.kit.helpers import WorkerProcess, column, register, wait_until
from tests.kit.models import Built, sklearn_model

QUEUE = "sklearn.cpu"
KEYS = Keys()


@pytest.fixture(scope="module")
def setup(private_redis: str, work_dir: Path) -> Iterator[tuple[Client, WorkerProcess, Built]]:
    built = sklearn_model(work_dir / "qe-iris", "qe-iris", "iris")
    client = Client.from_url(private_redis)
    register(client, built.directory)
    worker = WorkerProcess(private_redis, work_dir, "--queues", QUEUE)
    yield client, worker, built
    worker.stop()
    client.close()


def _frame(body: Any = None, *, raw_body: str | None = None, **changes: Any) -> bytes:
    """A well-formed hetbatch task frame, then ``changes`` (``h_<name>``: a header)."""
    message = json.loads(celery_message(TASK_NAME, [body if body is not None else {"v": 1}], QUEUE, 0, ""))
    if raw_body is not None:
        message["body"] = raw_body
    for name, value in changes.items():
        if name.startswith("h_"):
            message["headers"][name[2:]] = value
        else:
            message[name.replace("_", "-")] = value
    return json.dumps(message).encode()


def _b64(data: Any) -> str:
    return base64.b64encode(data if isinstance(data, bytes) else json.dumps(data).encode()).decode()


ENTRIES = {
    "garbage": b"garbage",
    "not utf-8": b"\xff\xfe\x00garbage",
    "json null": b"null",
    "a json list": b"[1, 2]",
    "no properties": json.dumps({"body": "", "headers": {}}).encode(),
    "properties not an object": json.dumps({"properties": "x", "body": ""}).encode(),
    "body not base64": _frame(raw_body="!!!not base64***"),
    "body an object": _frame(raw_body=_b64({"x": 1})),
    "body a short list": _frame(raw_body=_b64([1, 2])),
    "body not utf-8": _frame(raw_body=_b64(b"\xff\xfe")),
    "no arguments": _frame(raw_body=_b64([[], {}, {}])),
    "two arguments": _frame(raw_body=_b64([[{}, {}], {}, {}])),
    "keyword arguments": _frame(raw_body=_b64([[{}], {"a": 1}, {}])),
    "unknown task": _frame(h_task="os.system"),
    "eta": _frame(h_eta="not a date"),
    "timelimit": _frame(h_timelimit=[1]),
    "no task id": _frame(h_id=None),
    "pickle": _frame(content_type="application/x-python-serialize"),
    "fusion task, body a list": json.dumps(
        {**json.loads(_frame(raw_body=_b64([1, 2]))), "headers": {"task": FUSE_TASK_NAME, "id": "f"}}
    ).encode(),
}


def _dead_letters(r: redis.Redis) -> dict[str, dict[bytes, bytes]]:
    ids = [t.decode() for t in cast(list[bytes], r.lrange(KEYS.dlq(), 0, -1))]
    return {t: cast(dict[bytes, bytes], r.hgetall(KEYS.task(t))) for t in ids}


def _wait_dead_letter(r: redis.Redis, before: set[str], timeout_s: float = 5.0) -> dict[bytes, bytes]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        new = {t: e for t, e in _dead_letters(r).items() if t not in before}
        if new:
            assert len(new) == 1, new
            return next(iter(new.values()))
        time.sleep(0.05)
    raise AssertionError("no dead-letter entry within 5 s")


def _same_entry(stored: bytes, pushed: bytes) -> None:
    """The dead letter keeps the entry: as pushed, or re-encoded once kombu decoded its JSON."""
    try:
        assert json.loads(stored) == json.loads(pushed)
    except ValueError:
        assert stored == pushed.decode(errors="replace").encode()


def _good_job_is_right(client: Client, built: Built) -> None:
    out = client.predict("qe-iris", built.X[:20], timeout_s=30)
    np.testing.assert_array_equal(column(out, "label"), built.model.predict(built.X[:20]))


@pytest.mark.parametrize("name", list(ENTRIES))
def test_an_undecodable_queue_entry_is_dead_lettered_and_the_worker_goes_on(
    setup: tuple[Client, WorkerProcess, Built], name: str
) -> None:
    client, worker, built = setup
    pid = worker.proc.pid
    before = set(_dead_letters(client.redis))
    client.redis.lpush(priority_list(QUEUE, 0), ENTRIES[name])
    entry = _wait_dead_letter(client.redis, before)
    assert entry[b"queue"] == QUEUE.encode()
    assert entry[b"reason"]
    _same_entry(entry[b"raw"], ENTRIES[name])
    assert worker.alive() and worker.proc.pid == pid
    assert b"Unrecoverable" not in worker.log.read_bytes()
    _good_job_is_right(client, built)


def test_dead_letters_of_undecodable_entries_are_listed(setup: tuple[Client, WorkerProcess, Built]) -> None:
    client, _, _ = setup
    before = set(_dead_letters(client.redis))
    client.redis.lpush(priority_list(QUEUE, 3), b"garbage at priority 3")
    _wait_dead_letter(client.redis, before)
    shown = [e for e in DeadLetters(client.redis, KEYS).entries() if e.task_id not in before]
    assert len(shown) == 1
    assert (shown[0].model, shown[0].jobs, shown[0].queue) == ("-", (), QUEUE)
    assert "not a JSON kombu frame" in shown[0].reason


def test_an_undecodable_entry_on_the_host_queue_is_dead_lettered_too(
    setup: tuple[Client, WorkerProcess, Built],
) -> None:
    client, worker, built = setup
    pid = worker.proc.pid
    beat = json.loads(next(client.redis.get(k) for k in client.redis.scan_iter(match=KEYS.worker("*"))) or b"{}")
    host = next(q for q in beat["queues"] if q.startswith(f"{QUEUE}@"))
    before = set(_dead_letters(client.redis))
    client.redis.lpush(priority_list(host, 5), _frame(raw_body=_b64({"x": 1})))
    entry = _wait_dead_letter(client.redis, before)
    assert entry[b"queue"] == host.encode() and b"[args, kwargs, embed]" in entry[b"reason"]
    assert worker.alive() and worker.proc.pid == pid
    _good_job_is_right(client, built)


def _envelope(client: Client, job: str, **changes: Any) -> dict[str, Any]:
    rows = encode_table_rows(client, 3)
    body: dict[str, Any] = {
        "v": 1,
        "model": "qe-iris",
        "version": client.spec("qe-iris").version,
        "items": [[job, 0, 3]],
        "payload_b64": rows,
        "reply_to": client.replies.reply_key,
    }
    for name, value in changes.items():
        if value is _DROP:
            body.pop(name)
        else:
            body[name] = value
    return body


def encode_table_rows(client: Client, rows: int) -> str:
    import pyarrow as pa

    flat = pa.array(np.zeros(rows * 4))
    return base64.b64encode(encode_table(pa.table({"X": pa.FixedSizeListArray.from_arrays(flat, 4)}))).decode()


_DROP = object()


def _stored_error(r: redis.Redis, job: str, timeout_s: float = 5.0) -> RemoteError:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        raw = cast(bytes | None, r.get(KEYS.result(job, 0)))
        if raw is not None:
            result = decode_pack_result(raw)[0] if raw[:1] == b"P" else decode_result(raw)
            assert isinstance(result, RemoteError), "a refused envelope got a result"
            return result
        time.sleep(0.05)
    raise AssertionError(f"job {job} was not answered within 5 s")


MALFORMED = [
    ("model", 5),
    ("model", "m" * 10_000),
    ("version", _DROP),
    ("version", ["1"]),
    ("version", "V" * 200_000),  # before "items", and past the 64 KiB a dead letter keeps
    ("version", list(range(20_000))),
    ("deadline", "soon"),
    ("deadline", float("inf")),
    ("then", "not an object"),
    ("then", {"x": "y" * 100_000}),
    ("payload_b64", 7),
    ("payload_key", "hb:models"),  # a second payload reference
    ("reply_to", "hb:models"),
    ("pack", "not-a-pack"),
    ("pack", 12),
    ("v", 2),
]


@pytest.mark.parametrize("path", ["celery", "lane"])
@pytest.mark.parametrize(("field", "value"), MALFORMED)
def test_a_malformed_envelope_is_answered_with_a_payload_error_naming_job_and_field(
    setup: tuple[Client, WorkerProcess, Built], field: str, value: Any, path: str
) -> None:
    client, worker, built = setup
    pid = worker.proc.pid
    job = uuid.uuid4().hex
    body = _envelope(client, job, **{field: value})
    if path == "lane":  # the same envelope as a bare lane entry: answered, not only dead-lettered
        client.redis.lpush(lane_list(QUEUE), json.dumps(body))
    else:
        client.redis.lpush(priority_list(QUEUE, 0), celery_message(TASK_NAME, [body], QUEUE, 0, ""))
    error = _stored_error(client.redis, job)
    assert error.type == "PayloadError"
    assert f"job {job}" in error.message and repr(field) in error.message, error.message
    assert worker.alive() and worker.proc.pid == pid
    _good_job_is_right(client, built)


@pytest.mark.parametrize(
    ("field", "value"),
    [("items", "nonsense"), ("items", [["bad:id", 0, 3]]), ("items", [[None, 0, 3]]), ("items", [])],
)
def test_an_envelope_that_names_no_job_is_dead_lettered(
    setup: tuple[Client, WorkerProcess, Built], field: str, value: Any
) -> None:
    client, worker, built = setup
    body = _envelope(client, "x", **{field: value})
    before = set(_dead_letters(client.redis))
    client.redis.lpush(priority_list(QUEUE, 0), celery_message(TASK_NAME, [body], QUEUE, 0, ""))
    entry = _wait_dead_letter(client.redis, before)
    assert b"not a task envelope" in entry[b"reason"] and b"'items'" in entry[b"reason"]
    assert worker.alive()
    _good_job_is_right(client, built)


def _nested_frame(depth: int) -> bytes:
    """A good frame with a list nested ``depth`` deep in its delivery_info: decodable, but
    kombu re-encodes it deeper in the stack than it decoded it."""
    message = json.loads(_frame())
    message["properties"]["delivery_info"]["x"] = 0
    return json.dumps(message).replace('"x": 0', '"x": ' + "[" * depth + "]" * depth).encode()


def test_json_nested_past_the_stack_is_dead_lettered_on_queue_and_lane(
    setup: tuple[Client, WorkerProcess, Built],
) -> None:
    client, worker, built = setup
    pid = worker.proc.pid
    before = set(_dead_letters(client.redis))
    deep = [b"[" * 100_000, b"{" * 50_000, *(_nested_frame(d) for d in range(850, 1000, 10))]
    for raw in deep:
        client.redis.lpush(priority_list(QUEUE, 0), raw)
    client.redis.lpush(lane_list(QUEUE), b"[" * 100_000)
    deadline = time.monotonic() + 10
    while len(set(_dead_letters(client.redis)) - before) < len(deep) + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    new = [e for t, e in _dead_letters(client.redis).items() if t not in before]
    assert len(new) == len(deep) + 1, [e.get(b"reason") for e in new]
    assert sum(e[b"queue"] == lane_list(QUEUE).encode() for e in new) == 1
    assert worker.alive() and worker.proc.pid == pid
    assert b"Unrecoverable" not in worker.log.read_bytes()
    _good_job_is_right(client, built)


@pytest.mark.parametrize(
    "embed",
    [
        {"callbacks": "x", "errbacks": None, "chain": None, "chord": None},
        {"chain": [{"garbage": 1}]},
        {"chord": {"task": 1}},
        {"callbacks": None, "errbacks": None, "chain": None, "chord": None, "extra": None},
        "signature",  # a valid predict signature: it would make the worker publish a task
    ],
)
def test_a_body_whose_embed_sets_callbacks_or_chain_is_dead_lettered_before_celery_sees_it(
    setup: tuple[Client, WorkerProcess, Built], embed: Any
) -> None:
    client, worker, built = setup
    pid = worker.proc.pid
    job, victim = uuid.uuid4().hex, uuid.uuid4().hex
    body = _envelope(client, job)
    if embed == "signature":
        sig = {"task": TASK_NAME, "args": [_envelope(client, victim)], "kwargs": {}, "options": {"queue": QUEUE},
               "subtask_type": None, "immutable": True}  # fmt: skip
        embed = {"callbacks": [sig], "errbacks": [sig], "chain": [sig], "chord": None}
    before = set(_dead_letters(client.redis))
    client.redis.lpush(priority_list(QUEUE, 0), _frame(body, raw_body=_b64([[body], {}, embed])))
    entry = _wait_dead_letter(client.redis, before)
    assert b"embed sets" in entry[b"reason"] and entry[b"queue"] == QUEUE.encode(), entry[b"reason"]
    listed = [e for e in DeadLetters(client.redis, KEYS).entries() if e.task_id not in before]
    assert [e.jobs for e in listed] == [(job,)]  # named, though never run
    _good_job_is_right(client, built)
    assert client.redis.get(KEYS.result(job, 0)) is None and client.redis.get(KEYS.result(victim, 0)) is None
    # Nothing left to come back after the visibility timeout (the good job's ack may trail its result).
    wait_until(lambda: client.redis.hlen("unacked") == 0, "no unacked message", timeout_s=10)
    assert worker.alive() and worker.proc.pid == pid
