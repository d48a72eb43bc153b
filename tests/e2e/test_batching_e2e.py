"""Dynamic batching through a real worker: batches fill, and one bad job fails alone."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import redis

from hetbatch.producers import Client, JobFailed
from hetbatch.producers.protocol.keys import Keys
from hetbatch.worker.batching import BatchStats
from hetbatch.worker.devtools.redis_server import RedisServer
from hetbatch.worker.hooks import BatchStatsWriter
from tests.kit.helpers import WorkerProcess, batch_stats, column, register
from tests.kit.models import Built, sklearn_model


@pytest.fixture(scope="module")
def logreg(work_dir: Path, redis_url: str) -> Built:
    built = sklearn_model(work_dir / "batch-logreg", "batch-logreg", "breast_cancer", kind="logreg", nan="pass")
    with Client.from_url(redis_url) as c:
        register(c, built.directory)
    return built


def _stats(client: Client, name: str, requests: int) -> dict[str, float]:
    key = client.keys.batch_stats(client.spec(name).ref)
    raw = batch_stats(client.redis, key, lambda s: int(s.get(b"requests", 0)) >= requests)
    return {k.decode(): float(v) for k, v in raw.items()}


def test_a_backlog_of_single_jobs_fills_batches(work_dir: Path) -> None:
    """While a slow model call runs, the tasks that arrive meanwhile share the next call:
    prefetch and thread concurrency keep enough tasks in flight for that."""
    from hetbatch.worker.devtools.redis_server import RedisServer

    slow = sklearn_model(work_dir / "slow-forest", "slow-forest", "iris", trees=300)
    with RedisServer() as server, Client.from_url(server.url) as client:
        register(client, slow.directory)
        pieces = [slow.X[i % 140 : i % 140 + 1 + i % 3] for i in range(300)]
        jobs = [client.submit("slow-forest", p) for p in pieces]  # one task each: no client-side packing
        worker = WorkerProcess(server.url, work_dir)  # starts with the backlog waiting
        try:
            for job, piece in zip(jobs, pieces):
                np.testing.assert_allclose(
                    column(job.result(timeout_s=120), "probabilities"), slow.model.predict_proba(piece), atol=1e-6
                )
            stats = _stats(client, "slow-forest", len(pieces))
        finally:
            worker.stop()
    assert stats["requests"] == len(pieces)
    assert stats["requests"] / stats["batches"] >= 4, stats


def test_a_poisoned_job_fails_alone_and_the_other_63_succeed(
    client: Client, cpu_worker: WorkerProcess, logreg: Built
) -> None:
    pieces = [logreg.X[i : i + 2].copy() for i in range(64)]
    pieces[17][1, 3] = np.nan  # logistic regression raises on NaN: the merged call fails
    jobs = client.submit_many("batch-logreg", pieces)
    for i, (job, piece) in enumerate(zip(jobs, pieces)):
        if i == 17:
            with pytest.raises(JobFailed, match="NaN") as info:
                job.result(timeout_s=60)
            assert info.value.remote_type == "PredictError"
        else:
            np.testing.assert_allclose(
                column(job.result(timeout_s=60), "probabilities"), logreg.model.predict_proba(piece), atol=1e-6
            )


def test_batch_stats_survive_a_redis_outage() -> None:
    """Batch stats are written from their own thread: an outage costs the batches recorded
    while Redis is down, never the thread (found by the chaos run), and once Redis is back
    the next batches are counted again."""
    server = RedisServer()
    port = server.port
    client = redis.Redis.from_url(server.url, socket_timeout=2)
    key = Keys().batch_stats("m@1")
    writer = BatchStatsWriter(client, Keys())
    try:
        writer.after_batch("m@1", BatchStats(rows=4, requests=1, queue_wait_s=0.0, compute_s=0.01))
        assert batch_stats(client, key, lambda s: s.get(b"batches") == b"1")[b"rows"] == b"4"
        server.kill()
        server.stop()
        writer.after_batch("m@1", BatchStats(rows=8, requests=2, queue_wait_s=0.0, compute_s=0.01))
        time.sleep(0.5)  # the writer meets the outage
        assert writer.thread.is_alive()
        server = RedisServer(port=port)  # back, empty (no persistence), on the same address
        writer.after_batch("m@1", BatchStats(rows=16, requests=3, queue_wait_s=0.0, compute_s=0.01))
        stats = batch_stats(client, key, lambda s: int(s.get(b"rows", 0)) >= 16, timeout_s=10)
        assert (stats[b"batches"], stats[b"rows"], stats[b"requests"]) == (b"1", b"16", b"3")
        assert writer.thread.is_alive()
    finally:
        writer.close()
        server.stop()
    assert not writer.thread.is_alive()
