"""The reconciler on a real private Redis: it finds the task no queue holds and no result
answers, publishes it again with its task id, dead-letters it once its attempts are spent,
and one leader at a time sweeps. A real worker then runs what was republished."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from hetbatch.producers import Client, JobFailed
from hetbatch.producers.protocol.ledger import Ledger
from hetbatch.worker.devtools.redis_server import RedisServer
from hetbatch.worker.ops.reconciler import LeaderLock, Reconciler, Republisher
from tests.kit.broker import ledger_envelope, lose_message, queued_task_ids
from tests.kit.helpers import FAST_RECOVERY, WorkerProcess, column, register
from tests.kit.models import Built, sklearn_model


@pytest.fixture(scope="module")
def iris(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return sklearn_model(tmp_path_factory.mktemp("reconciler") / "rec-iris", "rec-iris")


@pytest.fixture()
def client(redis_server: RedisServer, iris: Built) -> Iterator[Client]:
    with Client.from_url(redis_server.url) as c:
        register(c, iris.directory)
        yield c


def test_the_leader_lock_has_one_holder_and_passes_on_when_released_or_expired(private_redis: str) -> None:
    r = redis.Redis.from_url(private_redis)
    first, second = LeaderLock(r, "test:leader", ttl_s=0.5), LeaderLock(r, "test:leader", ttl_s=0.5)
    assert first.acquire() and not second.acquire()
    assert first.acquire()  # the holder renews
    first.release()  # expires the lock in 1 ms (only its owner can): the next tick takes it
    time.sleep(0.05)
    assert second.acquire() and not first.acquire()
    time.sleep(0.7)  # the holder died: its lock expires
    assert first.acquire()


def test_a_queued_task_is_left_alone_and_looked_at_again_later(client: Client, iris: Built) -> None:
    job = client.submit("rec-iris", iris.X[:4])
    published: list[str] = []
    rec = Reconciler(client.redis, client.keys, lambda body, queue, tid: published.append(tid), overdue_s=0)
    for _ in range(3):
        report = rec.sweep()
        assert (report.checked, report.queued, report.republished) == (1, 1, [])
    assert published == [] and queued_task_ids(client, "rec-iris") == [f"{job.id}.0"]


def test_a_lost_task_is_republished_on_the_second_sweep_and_then_runs(
    client: Client, iris: Built, redis_server: RedisServer, tmp_path: Path
) -> None:
    lost = client.submit("rec-iris", iris.X[:5])
    task_id = f"{lost.id}.0"
    assert lose_message(client, "rec-iris", task_id) == 1
    with Republisher(redis_server.url) as pub:
        rec = Reconciler(client.redis, client.keys, pub.publish, overdue_s=0)
        first = rec.sweep()  # it could be between kombu's pop and its unacked record: wait
        assert (first.suspect, first.republished) == (1, [])
        second = rec.sweep()
        assert second.republished == [task_id]
    assert queued_task_ids(client, "rec-iris") == [task_id]  # the same task id, so results match up
    assert client.ledger.counters()["republished"] == 1
    worker = WorkerProcess(redis_server.url, tmp_path, env=FAST_RECOVERY)
    try:
        np.testing.assert_array_equal(column(lost.result(timeout_s=60), "label"), iris.model.predict(iris.X[:5]))
    finally:
        worker.stop()
    # Finished: nothing to publish, and the ledger forgets it (the worker's store or the sweep drops it).
    again: list[str] = []
    done = Reconciler(client.redis, client.keys, lambda body, queue, tid: again.append(tid), overdue_s=0).sweep()
    assert again == [] and done.republished == done.dead_lettered == []
    assert client.redis.zcard(client.keys.ledger()) == 0


def test_a_lost_task_out_of_attempts_is_dead_lettered(client: Client, iris: Built) -> None:
    job = client.submit("rec-iris", iris.X[:3])
    task_id = f"{job.id}.0"
    env, _body = ledger_envelope(client, task_id)
    ledger = Ledger(client.redis, client.keys)
    for n in range(3):  # three starts, each of which (say) killed its worker
        assert ledger.begin(env, worker=f"w:{n}", ttl_s=60, max_attempts=3, claim=True).verdict == "run"
    lose_message(client, "rec-iris", task_id)
    published: list[str] = []
    rec = Reconciler(
        client.redis, client.keys, lambda body, queue, tid: published.append(tid), overdue_s=0, max_attempts=3
    )
    rec.sweep()
    report = rec.sweep()
    assert report.dead_lettered == [task_id] and published == []
    with pytest.raises(JobFailed) as info:
        job.result(timeout_s=10)
    assert info.value.remote_type == "PoisonJob"
    assert [t.decode() for t in client.redis.lrange(client.keys.dlq(), 0, -1)] == [task_id]
