"""What ``Client`` and ``AsyncClient`` share, checked on both through one small adapter:
results equal the model's own in-process output, LOST counts as done, ``JobLost`` is
raised, and malformed reply notices do not stop delivery to other jobs."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from hetbatch import AsyncClient, AsyncJob, Client, Job, JobLost, PayloadError, PayloadTooLarge, Status
from hetbatch.producers.protocol import shm
from hetbatch.producers.protocol.ensemble import EnsembleSpec
from hetbatch.producers.protocol.keys import Keys
from hetbatch.producers.protocol.kombu import priority_list
from hetbatch.producers.protocol.schema import to_table
from hetbatch.producers.protocol.transport import Transport
from hetbatch.producers.protocol.wire import Item, TaskEnvelope, encode_table
from hetbatch.producers.publisher import Batch
from hetbatch.worker.devtools.redis_server import RedisServer
from tests.kit.helpers import WorkerProcess, column, register
from tests.kit.models import Built, sklearn_model

# Notices a hostile or broken writer could push on a reply list (LPUSH: read first).
MALFORMED = [
    b"garbage",
    b"\xff\xfe\x00",
    b"[1, 1e400]\n",  # int(inf): OverflowError, not PayloadError
    b"[1, NaN]\n",
    b'{"a": 1, "b": 2}\n',
    b"[1, 2, 3]\n",
    b"[" * 5000 + b"]" * 5000 + b"\n",  # nesting deep enough for a RecursionError
    b'["not-a-tracked-job", 0]\nAxyz',
]
NOBODY = "nobody-consumes-this.cpu"  # a queue no worker reads: its jobs stay pending


class Adapter:
    """One surface over both clients: every method blocks until done."""

    def __init__(self, kind: str, url: str) -> None:
        self.kind = kind
        self._runner = asyncio.Runner() if kind == "async" else None
        if self._runner is not None:
            self.aclient = self._runner.run(self._open(url))
            self.sync = self.aclient._sync
        else:
            self.sync = Client.from_url(url)

    @staticmethod
    async def _open(url: str) -> AsyncClient:
        return AsyncClient.from_url(url)

    def call(self, sync: Any, name: str, *args: Any, **kwargs: Any) -> Any:
        if self._runner is None:
            return getattr(sync, name)(*args, **kwargs)
        target = self.aclient if isinstance(sync, Client) else sync
        return self._runner.run(getattr(target, name)(*args, **kwargs))

    def submit(self, ref: str, data: Any, **options: Any) -> Job | AsyncJob:
        return self.call(self.sync, "submit", ref, data, **options)  # type: ignore[no-any-return]

    def submit_many(self, ref: str, datas: list[Any]) -> list[Any]:
        return self.call(self.sync, "submit_many", ref, datas)  # type: ignore[no-any-return]

    def result(self, job: Any, timeout_s: float = 120) -> Any:
        return self.call(job, "result", timeout_s=timeout_s)

    def status(self, job: Any) -> Status:
        return self.call(job, "status")  # type: ignore[no-any-return]

    def done(self, job: Any) -> bool:
        return self.call(job, "done")  # type: ignore[no-any-return]

    def reply_key(self) -> str:
        return self.sync.replies.reply_key

    def listener_alive(self) -> bool:
        if self._runner is None:
            return self.sync.replies._listener is not None and self.sync.replies._listener.is_alive()
        return self.aclient._listener is not None and not self.aclient._listener.done()

    def malformed(self) -> int:
        return self.sync.replies.inbox.malformed

    def close(self) -> None:
        if self._runner is None:
            self.sync.close()
            return
        self._runner.run(self.aclient.close())
        self._runner.close()


@pytest.fixture(scope="module")
def wine(work_dir: Path) -> Built:
    return sklearn_model(work_dir / "clients-wine", "clients-wine", "wine")


@pytest.fixture(scope="module")
def ref(redis_url: str, cpu_worker: WorkerProcess, wine: Built) -> str:
    with Client.from_url(redis_url) as client:
        return register(client, wine.directory)


@pytest.fixture(params=["sync", "async"])
def both(request: pytest.FixtureRequest, redis_url: str, ref: str) -> Iterator[Adapter]:
    adapter = Adapter(request.param, redis_url)
    yield adapter
    adapter.close()


def test_results_equal_in_process(both: Adapter, ref: str, wine: Built) -> None:
    whole = both.result(both.submit(ref, wine.X, chunk_rows=50))
    np.testing.assert_allclose(column(whole, "probabilities"), wine.model.predict_proba(wine.X), atol=1e-6)
    pieces = [wine.X[i : i + 1 + i % 5] for i in range(0, 90, 6)]
    for job, piece in zip(both.submit_many(ref, pieces), pieces, strict=True):
        np.testing.assert_array_equal(column(both.result(job), "label"), wine.model.predict(piece))
        assert both.status(job) is Status.DONE and both.done(job)


def test_a_lost_job_is_done_and_raises_job_lost(both: Adapter, ref: str, wine: Built, redis_url: str) -> None:
    both.sync._route = lambda spec: NOBODY  # type: ignore[method-assign]
    r = redis.Redis.from_url(redis_url)
    try:
        job = both.submit(ref, wine.X[:7])
        assert both.status(job) is Status.PENDING and not both.done(job)
        r.delete(Keys().job(job.unit))  # its record vanished: no worker will ever answer
        assert both.status(job) is Status.LOST
        assert both.done(job)  # LOST is final, as in the sync client
        started = time.monotonic()
        with pytest.raises(JobLost, match=job.id):
            both.result(job, timeout_s=30)
        assert time.monotonic() - started < 5  # found at the next sweep, not at the timeout
    finally:
        r.delete(NOBODY, *[f"{NOBODY}:{n}" for n in range(1, 10)])
        r.close()


def test_malformed_notices_do_not_stop_delivery(both: Adapter, ref: str, wine: Built, redis_url: str) -> None:
    first = both.submit(ref, wine.X[:3])  # starts the listener
    both.result(first)
    r = redis.Redis.from_url(redis_url)
    r.lpush(both.reply_key(), *MALFORMED)
    r.close()
    pieces = [wine.X[i : i + 4] for i in range(0, 40, 4)]
    started = time.monotonic()
    for piece in pieces:  # one at a time: each answered by its notice, not by a 1 s sweep
        np.testing.assert_array_equal(column(both.result(both.submit(ref, piece)), "label"), wine.model.predict(piece))
    elapsed = time.monotonic() - started
    assert both.listener_alive()
    assert both.malformed() >= len(MALFORMED) - 1  # the untracked job's notice is skipped, not malformed
    assert elapsed < 0.5 * len(pieces), f"{len(pieces)} jobs took {elapsed:.1f} s: were notices delivered?"


# -- publishing: one round trip, all or nothing ------------------------------------


def test_a_submit_retried_after_a_redis_crash_is_published_whole(wine: Built, tmp_path: Path) -> None:
    """Redis SIGKILLed before a submit and back (AOF always) while it retries: the retry
    sends the whole round trip (a redis-py pipeline would have sent an empty one)."""
    aof = ("--appendonly", "yes", "--appendfsync", "always", "--dir", str(tmp_path))
    server = RedisServer(*aof)
    client = Client.from_url(server.url, publish_retries=8, shm_dir="")
    again: RedisServer | None = None
    try:
        ref = register(client, wine.directory)
        client.spec(ref)  # cached (a versioned ref): the publish round trip is the first command
        server.kill()
        result: dict[str, Any] = {}

        def submit() -> None:
            try:
                result["job"] = client.submit(ref, np.repeat(wine.X, 4, axis=0))  # > inline: by key
            except Exception as exc:  # reported below
                result["error"] = exc

        thread = threading.Thread(target=submit)
        thread.start()
        time.sleep(0.5)  # a few tries fail on the connection
        again = RedisServer(*aof, port=server.port)
        thread.join(timeout=60)
        assert "error" not in result, result.get("error")
        job = result["job"]
        r = redis.Redis.from_url(again.url)
        keys, task = Keys(), f"{job.id}.0"
        assert r.exists(keys.job(job.id)) and r.exists(keys.input(job.id, 0)) and r.exists(keys.task(task))
        queue = priority_list(client.registry.model(ref).queue, 5)
        assert r.llen(queue) == 1  # the task message, once (the probe saw no earlier commit)
        r.close()
    finally:
        client.close()
        server.stop()
        if again is not None:
            again.stop()


def test_a_task_published_twice_is_answered_once_and_right(redis_url: str, ref: str, wine: Built) -> None:
    """A retry after an unknown outcome may publish a round trip twice: the ledger's
    duplicate check and first-write-wins results absorb the second copy."""
    with Client.from_url(redis_url) as client:
        spec = client.spec(ref)
        assert not isinstance(spec, EnsembleSpec)
        before = client.ledger.counters()
        job = Job(client.replies, uuid.uuid4().hex, spec.ref, 1, 20)
        client.replies.track(job.id, 1)
        batch = Batch()
        client.publisher.record(batch, job.id, job.model, 1, 20)
        payload = client.transport.place(encode_table(to_table(wine.X[:20], spec.inputs)), job.id, 0, batch)
        env = client._envelope(spec, [Item(job.id, 0, 20)], payload, None)
        client.publisher.enqueue(batch, spec.queue, env, 5)
        calls = list(batch.calls)
        client.publisher.send(batch)
        batch.calls[:] = calls  # the same commands again, as a blind retry would send them
        client.publisher.send(batch)
        np.testing.assert_array_equal(column(job.result(timeout_s=60), "label"), wine.model.predict(wine.X[:20]))
        names = ("duplicate_deliveries", "duplicates", "duplicate_results")
        deadline = time.monotonic() + 30
        while sum(client.ledger.counters().get(n, 0) - before.get(n, 0) for n in names) < 1:
            assert time.monotonic() < deadline, "the second copy was never absorbed"
            time.sleep(0.1)
        np.testing.assert_array_equal(column(job.result(timeout_s=5), "label"), wine.model.predict(wine.X[:20]))


# -- payload transport: names derived from the job id, sizes checked before reading --


def _env(job: str, **payload: str) -> TaskEnvelope:
    return TaskEnvelope("m", "1", (Item(job, 0, 3),), **payload)  # type: ignore[arg-type]


def test_the_worker_reads_only_the_payload_its_job_id_names(redis_url: str, tmp_path: Path) -> None:
    r = redis.Redis.from_url(redis_url)
    keys, job, other = Keys(), uuid.uuid4().hex, uuid.uuid4().hex
    transport = Transport(keys, str(tmp_path), max_bytes=1000)
    r.set(keys.input(job, 0), b"x" * 10, ex=60)
    r.set(keys.input(other, 0), b"y" * 10, ex=60)
    assert transport.read(r, _env(job, payload_key=keys.input(job, 0))) == b"x" * 10
    for named in (keys.input(other, 0), keys.models(), "anything"):
        with pytest.raises(PayloadError, match=job):
            transport.read(r, _env(job, payload_key=named))
    # Deletion after the result is stored uses the derivation, never the envelope's name.
    assert transport.consumed([_env(job, payload_key=keys.models())]) == ([keys.input(job, 0)], [])
    r.set(keys.input(job, 0), b"z" * 1001, ex=60)  # over the limit: refused after STRLEN
    with pytest.raises(PayloadTooLarge):
        transport.read(r, _env(job, payload_key=keys.input(job, 0)))
    r.delete(keys.input(job, 0))
    r.hset(keys.input(job, 0), "a", "b")  # WRONGTYPE: typed, not a redis ResponseError
    with pytest.raises(PayloadError, match="not a payload"):
        transport.read(r, _env(job, payload_key=keys.input(job, 0)))
    r.delete(keys.input(job, 0), keys.input(other, 0))
    with pytest.raises(JobLost):
        transport.read(r, _env(job, payload_key=keys.input(job, 0)))
    r.close()


def test_shared_memory_inputs_are_regular_files_of_the_job(redis_url: str, tmp_path: Path) -> None:
    r = redis.Redis.from_url(redis_url)
    transport = Transport(Keys(), str(tmp_path), max_bytes=1000)
    job, other = uuid.uuid4().hex, uuid.uuid4().hex
    name = shm.payload_name(job, 0)
    (tmp_path / name).write_bytes(b"abc")
    assert transport.read(r, _env(job, payload_shm=name)) == b"abc"
    (tmp_path / shm.payload_name(other, 0)).write_bytes(b"def")
    with pytest.raises(PayloadError, match="not a shared-memory payload name"):
        transport.read(r, _env(job, payload_shm=shm.payload_name(other, 0)))
    (tmp_path / name).unlink()
    os.mkfifo(tmp_path / name)  # would block an open() without O_NONBLOCK, and a read forever
    started = time.monotonic()
    with pytest.raises(PayloadError, match="not a regular file"):
        transport.read(r, _env(job, payload_shm=name))
    assert time.monotonic() - started < 1
    (tmp_path / name).unlink()
    (tmp_path / name).mkdir()
    with pytest.raises(PayloadError, match="not a regular file"):
        transport.read(r, _env(job, payload_shm=name))
    (tmp_path / name).rmdir()
    (tmp_path / name).symlink_to(tmp_path / shm.payload_name(other, 0))
    with pytest.raises(PayloadError):  # O_NOFOLLOW: a link is refused, not followed
        transport.read(r, _env(job, payload_shm=name))
    (tmp_path / name).unlink()
    (tmp_path / name).write_bytes(b"q" * 1001)
    with pytest.raises(PayloadError, match="over the limit"):
        transport.read(r, _env(job, payload_shm=name))
    r.close()
