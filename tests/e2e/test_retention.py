"""Retention on a real private Redis: ``delete_job`` and ``purge_model`` free what a job or
a model left behind before the TTLs do, and touch nothing of any other model."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from hetbatch.producers import Client
from hetbatch.producers.protocol.retention import delete_job, purge_model
from hetbatch.worker.devtools.redis_server import RedisServer
from hetbatch.worker.ops.reconciler import Reconciler
from tests.kit.broker import queued_task_ids
from tests.kit.helpers import register
from tests.kit.models import Built, sklearn_model


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    work = tmp_path_factory.mktemp("retention")
    return {name: sklearn_model(work / name, name, trees=5) for name in ("keep-iris", "drop-iris")}


@pytest.fixture()
def client(redis_server: RedisServer, models: dict[str, Built]) -> Iterator[Client]:
    # Inputs over 1 KiB go by Redis key, so both kinds of payload are covered.
    with Client.from_url(redis_server.url, inline_max_bytes=1024) as c:
        for built in models.values():
            register(c, built.directory)
        yield c


def _keys_of(client: Client, job_id: str) -> list[bytes]:
    """Every key naming the job but its tombstone (which says it was deleted or purged)."""
    tomb = client.keys.gone(job_id).encode()
    return sorted(k for k in client.redis.scan_iter(match="*", count=1000) if job_id.encode() in k and k != tomb)


def _republished(client: Client) -> list[str]:
    """What the reconciler would publish again now (two sweeps: it acts on the second).

    A dropped job must not come back: its ledger entry goes with it, or the reconciler
    finds a task with no message and no result and publishes it again.
    """
    published: list[str] = []
    rec = Reconciler(client.redis, client.keys, lambda body, queue, tid: published.append(tid), overdue_s=0)
    rec.sweep()
    rec.sweep()
    return published


def test_delete_job_drops_the_jobs_record_and_inputs(client: Client, models: dict[str, Built]) -> None:
    X = np.repeat(models["keep-iris"].X, 4, axis=0)  # ~19 KB: its input is a Redis key
    job = client.submit("keep-iris", X)
    assert _keys_of(client, job.id)  # the record and the input
    existed = delete_job(client.redis, client.keys, job.id, chunks=1)
    assert existed >= 2 and _keys_of(client, job.id) == []
    assert client.redis.get(client.keys.gone(job.id)) == b"deleted"
    assert _republished(client) == []


def test_purge_model_drops_its_queued_work_and_keys_and_nothing_else(client: Client, models: dict[str, Built]) -> None:
    assert client.spec("keep-iris").queue == client.spec("drop-iris").queue  # one queue, two models
    X = models["drop-iris"].X
    dropped = [client.submit("drop-iris", X[i : i + 3]) for i in range(3)] + [client.submit("drop-iris", X)]
    kept = [client.submit("keep-iris", X[i : i + 3]) for i in range(2)]
    report = purge_model(client.redis, client.keys, "drop-iris", client.spec("drop-iris").queue)
    assert (report.messages, report.jobs) == (4, 4) and report.keys >= 4
    assert sorted(queued_task_ids(client, "keep-iris")) == sorted(f"{j.id}.0" for j in kept)
    assert all(_keys_of(client, j.id) == [] for j in dropped)
    assert all(client.redis.get(client.keys.gone(j.id)) == b"purged" for j in dropped)
    assert all(client.redis.exists(client.keys.job(j.id)) for j in kept)
    assert _republished(client) == []
    # Through the client: the same, by name.
    assert client.purge("keep-iris").messages == 2
    assert queued_task_ids(client, "keep-iris") == []
