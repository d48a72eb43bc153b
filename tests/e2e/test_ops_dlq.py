"""The dead-letter list on a real private Redis: bury, list, retry and purge, with the
``PoisonJob`` result a producer sees instead of waiting forever."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hetbatch.producers import Client, JobFailed, Status
from hetbatch.worker.devtools.redis_server import RedisServer
from hetbatch.worker.ops.dlq import DeadLetters
from hetbatch.worker.ops.reconciler import Republisher
from tests.kit.broker import ledger_envelope, lose_message, queued_task_ids
from tests.kit.helpers import register
from tests.kit.models import Built, sklearn_model


@pytest.fixture(scope="module")
def iris(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return sklearn_model(tmp_path_factory.mktemp("dlq") / "dlq-iris", "dlq-iris")


@pytest.fixture()
def client(redis_server: RedisServer, iris: Built) -> Iterator[Client]:
    with Client.from_url(redis_server.url) as c:
        register(c, iris.directory)
        yield c


def _bury(client: Client, iris: Built, rows: slice) -> tuple[str, str]:
    """Submit a job and dead-letter its task as if it had killed three workers; (job id, task id)."""
    job = client.submit("dlq-iris", iris.X[rows])
    task_id = f"{job.id}.0"
    lose_message(client, "dlq-iris", task_id)
    env, _body = ledger_envelope(client, task_id)
    DeadLetters(client.redis, client.keys).bury(env, 3, "test: killed 3 workers", client.spec("dlq-iris").queue)
    return job.id, task_id


def test_a_buried_task_is_listed_and_its_job_fails_with_poison_job(client: Client, iris: Built) -> None:
    job_id, task_id = _bury(client, iris, slice(0, 4))
    (entry,) = DeadLetters(client.redis, client.keys).entries()
    assert (entry.task_id, entry.jobs, entry.attempts) == (task_id, (job_id,), 3)
    assert entry.model == client.spec("dlq-iris").ref and entry.queue == client.spec("dlq-iris").queue
    assert entry.reason == "test: killed 3 workers" and entry.dead > 0
    with pytest.raises(JobFailed) as info:
        client.job(job_id).result(timeout_s=10)
    assert info.value.remote_type == "PoisonJob" and f"hetbatch dlq retry {task_id}" in str(info.value)
    assert client.redis.zscore(client.keys.ledger(), task_id) is None  # the reconciler stops looking
    assert client.ledger.counters()["dead_lettered"] == 1


def test_retry_clears_the_poison_result_and_publishes_the_task_again(
    client: Client, iris: Built, redis_server: RedisServer
) -> None:
    job_id, task_id = _bury(client, iris, slice(4, 9))
    dlq = DeadLetters(client.redis, client.keys)
    with Republisher(redis_server.url) as pub:
        assert dlq.retry([task_id, "no-such.0"], pub.publish) == [task_id]
    assert dlq.entries() == []
    assert client.job(job_id).status() is Status.PENDING  # the stale error is gone: first write wins
    assert queued_task_ids(client, "dlq-iris") == [task_id]
    assert client.redis.hget(client.keys.task(task_id), "attempts") == b"0"  # a fresh attempt budget


def test_purge_forgets_the_given_tasks_or_all(client: Client, iris: Built) -> None:
    buried = [_bury(client, iris, slice(i, i + 2))[1] for i in range(0, 6, 2)]
    dlq = DeadLetters(client.redis, client.keys)
    assert dlq.purge([buried[0]]) == 1
    assert sorted(e.task_id for e in dlq.entries()) == sorted(buried[1:])
    assert dlq.purge() == 2 and dlq.entries() == []
    assert not any(client.redis.exists(client.keys.task(t)) for t in buried)


def test_entries_whose_ledger_record_expired_are_dropped(client: Client) -> None:
    client.redis.lpush(client.keys.dlq(), "expired-job.0")
    assert DeadLetters(client.redis, client.keys).entries() == []
    assert client.redis.llen(client.keys.dlq()) == 0
