"""No job lost: killed workers, killed pool children, poison jobs, lost messages, Redis restarts.

Every test here runs on its own private redis-server (they kill workers and Redis),
with real worker processes and a real model; results are compared with the model's
in-process predictions. Recovery knobs are lowered (visibility timeout 8 s) so the
tests wait seconds, not minutes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import redis

from hetbatch.producers import BrokerError, Client, ClientSettings, JobFailed, JobLost, Status
from hetbatch.producers.protocol.keys import Keys
from hetbatch.producers.protocol.ledger import task_id_of
from hetbatch.producers.protocol.wire import TaskEnvelope
from hetbatch.worker.devtools.redis_server import RedisServer
from hetbatch.worker.ops.dlq import DeadLetters
from tests.kit.faults import FaultyWorker
from tests.kit.helpers import FAST_RECOVERY, ROOT, WorkerProcess, column, register, wait_until
from tests.kit.models import Built, sklearn_model

FAST = {**FAST_RECOVERY, "HETBATCH_CONCURRENCY": "4"}


@pytest.fixture()
def private_redis(redis_server: RedisServer) -> RedisServer:
    return redis_server


@pytest.fixture(scope="module")
def iris_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reliability")


def _model(work: Path, name: str, **options: float) -> Built:
    return sklearn_model(work / name, name, "iris", options=options or None)


def _cli(url: str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-m", "hetbatch", "--redis-url", url, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
        check=True,
    )
    return out.stdout


def test_attempts_are_recorded_per_job(private_redis: RedisServer, iris_dir: Path) -> None:
    built = _model(iris_dir, "att-iris")
    worker = WorkerProcess(private_redis.url, iris_dir, env=FAST)
    try:
        with Client.from_url(private_redis.url) as client:
            register(client, built.directory)
            job = client.submit("att-iris", built.X[:10])
            np.testing.assert_array_equal(column(job.result(timeout_s=120), "label"), built.model.predict(built.X[:10]))
            attempts = job.attempts()
            assert [(a.chunk, a.number) for a in attempts] == [(0, 1)]
            assert attempts[0].worker.endswith(f":{worker.proc.pid}")
            assert attempts[0].task_id == f"{job.id}.0"
            assert client.ledger.counters()["attempts"] >= 1
    finally:
        worker.stop()


def test_sigkilled_threads_worker_keeps_its_message_unacked_until_redelivered(
    private_redis: RedisServer, iris_dir: Path
) -> None:
    """With the threads pool the 'child' is the worker process itself: kill it mid-batch."""
    built = _model(iris_dir, "slow-iris", sleep_s=3.0)
    first = FaultyWorker(private_redis.url, iris_dir, env=FAST)
    second = None
    try:
        with Client.from_url(private_redis.url) as client:
            register(client, built.directory)
            job = client.submit("slow-iris", built.X[:7])
            wait_until(lambda: len(job.attempts()) == 1, "the first attempt", timeout_s=120)
            first.kill()
            unacked = client.redis.hvals("unacked")
            assert any(f"{job.id}.0" in json.loads(raw)[0]["headers"]["id"] for raw in unacked), "message was acked"
            assert job.status() is Status.PENDING
            second = FaultyWorker(private_redis.url, iris_dir, env=FAST)
            out = job.result(timeout_s=180)
            np.testing.assert_array_equal(column(out, "label"), built.model.predict(built.X[:7]))
            attempts = job.attempts()
            assert [a.number for a in attempts] == [1, 2]
            assert attempts[0].worker != attempts[1].worker
            assert client.ledger.counters()["duplicates"] >= 1
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_killed_prefork_pool_child_is_redelivered_not_acked(private_redis: RedisServer, iris_dir: Path) -> None:
    """The OOM killer's view: SIGKILL the pool child mid-batch; reject_on_worker_lost requeues."""
    built = _model(iris_dir, "slow-iris2", sleep_s=3.0)
    worker = FaultyWorker(private_redis.url, iris_dir, env=FAST, mode="prefork")
    try:
        with Client.from_url(private_redis.url) as client:
            register(client, built.directory)
            job = client.submit("slow-iris2", built.X[:5])
            wait_until(lambda: len(job.attempts()) == 1, "the first attempt", timeout_s=120)
            child_pid = int(job.attempts()[0].worker.rsplit(":", 1)[1])
            assert child_pid in [c.pid for c in psutil.Process(worker.proc.pid).children()]
            os.kill(child_pid, signal.SIGKILL)
            out = job.result(timeout_s=180)
            np.testing.assert_array_equal(column(out, "label"), built.model.predict(built.X[:5]))
            assert [a.number for a in job.attempts()] == [1, 2]
            assert worker.alive(), "the parent worker survives its child"
            assert "lane off" in worker.output()  # lane batches would run in the parent
            assert "WorkerLostError" in worker.output() or "exited prematurely" in worker.output()
    finally:
        worker.stop()


@pytest.mark.slow
def test_poison_job_is_dead_lettered_after_the_cap_and_others_are_unaffected(
    private_redis: RedisServer, iris_dir: Path
) -> None:
    built = _model(iris_dir, "poison-iris", crash_on=99.0)
    workers = [FaultyWorker(private_redis.url, iris_dir, env=FAST) for _ in range(2)]
    restarts = 0
    try:
        with Client.from_url(private_redis.url) as client:
            register(client, built.directory)
            poison_x = built.X[:3].copy()
            poison_x[1, 0] = 99.0
            poison = client.submit("poison-iris", poison_x)
            good = [client.submit("poison-iris", built.X[i : i + 5]) for i in range(0, 100, 5)]
            deadline = time.monotonic() + 400
            while poison.status() is Status.PENDING:
                assert time.monotonic() < deadline, "poison job never dead-lettered"
                for i, w in enumerate(workers):
                    if not w.alive():  # a supervisor (systemd, k8s) would restart it
                        w.stop()
                        workers[i] = FaultyWorker(private_redis.url, iris_dir, env=FAST)
                        restarts += 1
                time.sleep(0.5)
            with pytest.raises(JobFailed) as info:
                poison.result(timeout_s=10)
            assert info.value.remote_type == "PoisonJob"
            assert restarts == 3
            assert [a.number for a in poison.attempts()] == [1, 2, 3]
            for i, job in zip(range(0, 100, 5), good, strict=True):
                x = built.X[i : i + 5]
                np.testing.assert_array_equal(column(job.result(timeout_s=120), "label"), built.model.predict(x))
            listing = _cli(private_redis.url, "dlq", "list")
            assert f"{poison.id}.0" in listing and "attempts=3" in listing
            assert "purged 1" in _cli(private_redis.url, "dlq", "purge")
            assert "empty" in _cli(private_redis.url, "dlq", "list")
    finally:
        for w in workers:
            w.stop()


def test_lost_message_is_republished_and_dead_letters_can_be_retried(
    private_redis: RedisServer, iris_dir: Path
) -> None:
    built = _model(iris_dir, "lost-iris")
    with Client.from_url(private_redis.url) as client:
        register(client, built.directory)
        lost = client.submit("lost-iris", built.X[:4])
        buried = client.submit("lost-iris", built.X[4:9])
        # The message of `lost` vanishes (as between kombu's pop and its unacked record).
        queue = client.spec("lost-iris").queue
        lists = [queue] + [f"{queue}:{p}" for p in range(1, 10)]  # kombu's priority lists
        removed = 0
        for name in lists:
            for raw in client.redis.lrange(name, 0, -1):
                if json.loads(raw)["headers"]["id"] == f"{lost.id}.0":
                    removed += client.redis.lrem(name, 1, raw)
        assert removed == 1
        # `buried` is dead-lettered as if it had killed three workers.
        body = json.loads(client.redis.hget(Keys().task(f"{buried.id}.0"), "env"))
        DeadLetters(client.redis, client.keys).bury(TaskEnvelope.from_dict(body), 3, "test: killed 3 workers")
        with pytest.raises(JobFailed, match="PoisonJob"):
            buried.result(timeout_s=10)
        assert f"{buried.id}.0" in _cli(private_redis.url, "dlq", "list")
        out = _cli(private_redis.url, "reconcile", "--once", "--overdue-s", "0")
        assert "republished=1" in out, out
        assert any(f"{lost.id}.0" in str(client.redis.lrange(name, 0, -1)) for name in lists)
        assert "retried 1" in _cli(private_redis.url, "dlq", "retry", f"{buried.id}.0")
        worker = WorkerProcess(private_redis.url, iris_dir, env=FAST)
        try:
            np.testing.assert_array_equal(column(lost.result(timeout_s=120), "label"), built.model.predict(built.X[:4]))
            again = client.job(buried.id)
            np.testing.assert_array_equal(
                column(again.result(timeout_s=120), "label"), built.model.predict(built.X[4:9])
            )
            counters = client.ledger.counters()
            assert counters["republished"] == 1 and counters["dead_lettered"] == 1
        finally:
            worker.stop()


def test_jobs_lost_with_a_redis_without_persistence_are_reported_lost(iris_dir: Path) -> None:
    built = _model(iris_dir, "gone-iris")
    server = RedisServer()
    port = server.port
    try:
        with Client.from_url(server.url) as client:
            register(client, built.directory)
            jobs = [client.submit("gone-iris", built.X[i : i + 3]) for i in range(0, 9, 3)]
            assert all(j.status() is Status.PENDING for j in jobs)
            server.kill()
            server.stop()
            server = RedisServer(port=port)
            for job in jobs:
                assert job.status() is Status.LOST
                with pytest.raises(JobLost, match="vanished"):
                    job.result(timeout_s=30)
    finally:
        server.stop()


def test_publishing_to_a_dead_redis_raises_broker_error_after_a_bounded_retry(iris_dir: Path) -> None:
    built = _model(iris_dir, "dead-iris")
    server = RedisServer()
    with Client(ClientSettings.from_env(redis_url=server.url, publish_retries=3)) as client:
        register(client, built.directory)
        client.spec("dead-iris")
        server.kill()
        server.stop()
        started = time.monotonic()
        with pytest.raises(BrokerError, match=r"unreachable|could not publish"):
            client.submit("dead-iris", built.X[:2])
        assert time.monotonic() - started < 60, "the retry budget must be bounded"
        with pytest.raises(redis.ConnectionError):
            client.redis.ping()


@pytest.mark.slow
def test_chaos_small_worker_kills_and_a_redis_restart_lose_no_job(tmp_path: Path) -> None:
    from scripts.chaos import run_chaos

    # A 0.5 s model call keeps a few jobs in the victim's hands at each kill: they need a second attempt.
    report = run_chaos(
        150,
        kill_every_s=4.0,
        redis_kill_at_s=4.0,
        rate_per_s=15.0,
        work_dir=tmp_path,
        model_sleep_s=0.5,
        collect_timeout_s=180,
    )
    print(report)
    assert report.worker_kills >= 1 and report.redis_kills == 1
    assert report.jobs_with_retries > 0, "no kill caught a job in flight: the run proves nothing about redelivery"
    assert report.lost == report.wrong == report.errors == report.missing_results == 0
    assert report.counters["dlq_length"] == 0


def test_task_id_is_the_first_items_job_and_chunk() -> None:
    env = TaskEnvelope.from_dict({"v": 1, "model": "m", "version": "1", "items": [["abc", 2, 5]], "payload_b64": ""})
    assert task_id_of(env) == "abc.2"


def test_batch_stats_survive_a_redis_outage() -> None:
    """Stats are written from their own thread: an outage must not kill it (found by chaos)."""
    import redis

    from hetbatch.producers.protocol.keys import Keys
    from hetbatch.worker.batching import BatchStats
    from hetbatch.worker.hooks import BatchStatsWriter

    server = RedisServer()
    client = redis.Redis.from_url(server.url, socket_timeout=2)
    writer = BatchStatsWriter(client, Keys())
    server.kill()
    server.stop()
    writer.after_batch("m@1", BatchStats(rows=4, requests=1, queue_wait_s=0.0, compute_s=0.0))
    time.sleep(0.5)  # the writer meets the outage
    assert writer.thread.is_alive()
    writer.close()
    assert not writer.thread.is_alive()
