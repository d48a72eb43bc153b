"""The job ledger on a real private Redis: what a producer records before publishing, what
a worker's start records, and the verdicts that keep a poison job from killing workers.

No worker runs here except where a real result is needed (``done``); the tasks are the
ones a real ``Client.submit`` recorded.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from hetbatch.producers import Client
from hetbatch.producers.protocol.ledger import Ledger, task_id_of
from hetbatch.worker.devtools.redis_server import RedisServer
from tests.kit.broker import ledger_envelope, queued_task_ids
from tests.kit.helpers import WorkerProcess, column, register
from tests.kit.models import Built, sklearn_model


@pytest.fixture(scope="module")
def iris(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return sklearn_model(tmp_path_factory.mktemp("ledger") / "ledger-iris", "ledger-iris")


@pytest.fixture()
def client(redis_server: RedisServer, iris: Built) -> Iterator[Client]:
    """A client on a Redis of the test's own (the counters start at zero), model registered."""
    with Client.from_url(redis_server.url) as c:
        register(c, iris.directory)
        yield c


def test_a_submitted_task_is_recorded_before_it_is_published(client: Client, iris: Built) -> None:
    job = client.submit("ledger-iris", iris.X[:7])
    task_id = f"{job.id}.0"
    record = client.redis.hgetall(client.keys.task(task_id))
    assert {b"env", b"queue", b"published"} <= set(record)
    assert record[b"queue"].decode() == client.spec("ledger-iris").queue
    env, _body = ledger_envelope(client, task_id)
    assert task_id_of(env) == task_id and [i.job_id for i in env.items] == [job.id]
    assert client.redis.zscore(client.keys.ledger(), task_id) is not None
    assert queued_task_ids(client, "ledger-iris") == [task_id]
    assert client.redis.ttl(client.keys.task(task_id)) > 0  # the record never outlives the job


def test_a_second_start_is_suspect_until_claimed_and_dead_at_the_cap(client: Client, iris: Built) -> None:
    job = client.submit("ledger-iris", iris.X[:3])
    env, _body = ledger_envelope(client, f"{job.id}.0")
    ledger = Ledger(client.redis, client.keys)
    first = ledger.begin(env, worker="w1:1", ttl_s=60, max_attempts=3)
    assert (first.verdict, first.attempts, first.done) == ("run", 1, (False,))
    # Attempted before: it may have killed a worker, so it is run alone, only once claimed.
    again = ledger.begin(env, worker="w2:2", ttl_s=60, max_attempts=3)
    assert (again.verdict, again.attempts) == ("suspect", 1)
    assert ledger.begin(env, worker="w2:2", ttl_s=60, max_attempts=3, claim=True).verdict == "run"
    assert ledger.begin(env, worker="w3:3", ttl_s=60, max_attempts=3, claim=True).verdict == "run"
    capped = ledger.begin(env, worker="w4:4", ttl_s=60, max_attempts=3, claim=True)
    assert (capped.verdict, capped.attempts) == ("dead", 3)
    attempts = ledger.attempts(job.id)
    assert [(a.chunk, a.number, a.worker, a.task_id) for a in attempts] == [
        (0, 1, "w1:1", f"{job.id}.0"),
        (0, 2, "w2:2", f"{job.id}.0"),
        (0, 3, "w3:3", f"{job.id}.0"),
    ]
    assert attempts == job.attempts()
    counters = ledger.counters()
    assert counters["attempts"] == 3 and counters["duplicates"] == 2


def test_begin_many_answers_as_begin_does_in_one_round_trip(client: Client, iris: Built) -> None:
    jobs = [client.submit("ledger-iris", iris.X[i : i + 2]) for i in range(0, 8, 2)]
    envs = [ledger_envelope(client, f"{j.id}.0")[0] for j in jobs]
    ledger = Ledger(client.redis, client.keys)
    ledger.begin(envs[0], worker="w:1", ttl_s=60, max_attempts=3)
    starts = ledger.begin_many(envs, worker="w:2", ttl_s=60, max_attempts=3)
    assert [s.verdict for s in starts] == ["suspect", "run", "run", "run"]
    assert [s.attempts for s in starts] == [1, 1, 1, 1]


def test_forget_drops_the_entries_of_tasks_that_were_not_published(client: Client, iris: Built) -> None:
    job = client.submit("ledger-iris", iris.X[:2])
    env, _body = ledger_envelope(client, f"{job.id}.0")
    Ledger(client.redis, client.keys).forget([env])
    assert client.redis.zscore(client.keys.ledger(), f"{job.id}.0") is None
    assert not client.redis.exists(client.keys.task(f"{job.id}.0"))


def test_a_task_whose_results_are_stored_is_done_a_duplicate_delivery(
    client: Client, iris: Built, redis_server: RedisServer
) -> None:
    worker = WorkerProcess(redis_server.url, iris.directory.parent)
    try:
        job = client.submit("ledger-iris", iris.X[:6])
        np.testing.assert_array_equal(column(job.result(timeout_s=60), "label"), iris.model.predict(iris.X[:6]))
    finally:
        worker.stop()
    env, _body = ledger_envelope(client, f"{job.id}.0")
    ledger = Ledger(client.redis, client.keys)
    before = ledger.counters().get("duplicate_deliveries", 0.0)
    start = ledger.begin(env, worker="late:1", ttl_s=60, max_attempts=3)
    assert (start.verdict, start.done) == ("done", (True,))
    assert ledger.counters()["duplicate_deliveries"] == before + 1
    assert [a.number for a in ledger.attempts(job.id)] == [1]  # a done task records no attempt
