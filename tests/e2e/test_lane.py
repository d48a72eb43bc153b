"""The lane: small normal-priority jobs pushed as bare envelopes and drained in batches.

Real Redis (private servers), real worker processes, real models; every result is
compared with the model's in-process predictions.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from hetbatch.producers import Client, JobFailed, Status
from hetbatch.producers.protocol.keys import Keys, lane_list
from hetbatch.producers.protocol.kombu import priority_list, priority_lists, queue_depths
from hetbatch.worker.devtools.redis_server import RedisServer
from hetbatch.worker.ops.dlq import DeadLetters
from hetbatch.worker.ops.reconciler import Reconciler
from tests.kit.faults import FaultyWorker
from tests.kit.helpers import FAST_RECOVERY, WorkerProcess, column, register
from tests.kit.models import Built, sklearn_model

QUEUE = "sklearn.cpu"


@pytest.fixture(scope="module")
def iris(work_dir: Path) -> Built:
    return sklearn_model(work_dir / "lane-iris", "lane-iris", "iris", nan="reject")


def _pieces(built: Built, jobs: int) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [built.X[s : s + n] for s, n in zip(rng.integers(0, 134, jobs), rng.integers(1, 17, jobs))]


def _vouch(r: redis.Redis) -> None:
    """What the heartbeat of a worker that drains the lane keeps fresh; set here so that
    jobs can be queued on the lane before the worker starts."""
    r.set(Keys().alive(lane_list(QUEUE)), "test", px=120_000)


def _await_lane_worker(r: redis.Redis) -> None:
    deadline = time.monotonic() + 30
    while not r.exists(Keys().alive(lane_list(QUEUE))):
        assert time.monotonic() < deadline, "no worker announced that it drains the lane"
        time.sleep(0.05)


def _waiting(r: redis.Redis) -> tuple[int, int]:
    """(messages on the queue's Celery lists, envelopes on its lane)."""
    return sum(int(r.llen(k)) for k in priority_lists(QUEUE)), int(r.llen(lane_list(QUEUE)))


def test_small_jobs_take_the_lane_and_match_in_process(redis_server: RedisServer, iris: Built, work_dir: Path) -> None:
    pieces = _pieces(iris, 300)
    with Client.from_url(redis_server.url, lane_max_rows=16) as client:
        register(client, iris.directory)
        early = client.submit("lane-iris", iris.X[:2])  # no worker drains the lane: Celery
        assert _waiting(client.redis) == (1, 0)
    with Client.from_url(redis_server.url, lane_max_rows=16) as client:
        _vouch(client.redis)
        jobs = [client.submit("lane-iris", p) for p in pieces]
        big = client.submit("lane-iris", iris.X[:40])  # over lane_max_rows: a Celery task
        urgent = client.submit("lane-iris", iris.X[:3], priority="high")  # the lane is normal priority only
        assert _waiting(client.redis) == (3, 300)
        assert client.redis.llen(priority_list(QUEUE, 0)) == 1
        assert queue_depths(client.redis, [QUEUE])[QUEUE][5] == 302  # status counts lane jobs as normal
        worker = WorkerProcess(redis_server.url, work_dir)
        try:
            for piece, job in zip(pieces, jobs, strict=True):
                out = job.result(timeout_s=60)
                np.testing.assert_array_equal(column(out, "label"), iris.model.predict(piece))
                np.testing.assert_allclose(column(out, "probabilities"), iris.model.predict_proba(piece), atol=1e-6)
            for job, rows in ((big, 40), (urgent, 3), (early, 2)):
                np.testing.assert_array_equal(
                    column(job.result(timeout_s=60), "label"), iris.model.predict(iris.X[:rows])
                )
            assert _waiting(client.redis) == (0, 0)
            assert not client.redis.hgetall(Keys().held_index())  # nothing left held
            assert not list(client.redis.scan_iter(match=Keys().held_index() + ":*"))
            assert client.redis.zcard(Keys().ledger()) == 0  # every task answered
            # Drained in batches: far fewer ledger round trips than jobs would show as
            # one attempt each, all recorded.
            assert client.ledger.counters()["attempts"] == 303
        finally:
            worker.stop()


def test_bad_lane_entries_fail_alone_and_the_worker_stays_up(
    redis_server: RedisServer, iris: Built, work_dir: Path
) -> None:
    with Client.from_url(redis_server.url, lane_max_rows=16) as client:
        register(client, iris.directory)
        bad = iris.X[:4].copy()
        bad[1, 2] = np.nan
        _vouch(client.redis)
        before = client.submit("lane-iris", iris.X[:5])
        poisoned = client.submit("lane-iris", bad)
        client.redis.lpush(lane_list(QUEUE), b"\x00not json", json.dumps({"v": 1, "items": "nonsense"}))
        after = client.submit("lane-iris", iris.X[5:9])
        worker = WorkerProcess(redis_server.url, work_dir)
        try:
            np.testing.assert_array_equal(column(before.result(timeout_s=60), "label"), iris.model.predict(iris.X[:5]))
            np.testing.assert_array_equal(column(after.result(timeout_s=60), "label"), iris.model.predict(iris.X[5:9]))
            with pytest.raises(JobFailed, match="NaN") as info:
                poisoned.result(timeout_s=60)
            assert info.value.remote_details["column"] == "X"
            assert worker.alive()
            # Entries that are not envelopes name no job: dead-lettered raw, with the reason.
            reasons = [e.reason for e in DeadLetters(client.redis, Keys()).entries() if e.task_id.startswith("raw-")]
            assert len(reasons) == 2 and any("not JSON" in r for r in reasons), reasons
            assert "is not an envelope; dead-lettered" in worker.output()
        finally:
            worker.stop()


def test_a_sigkilled_workers_lane_jobs_are_published_again(redis_server: RedisServer, work_dir: Path) -> None:
    slow = sklearn_model(work_dir / "lane-slow", "lane-slow", "iris", options={"sleep_s": 3.0})
    first = FaultyWorker(redis_server.url, work_dir, env=FAST_RECOVERY)
    second = None
    try:
        with Client.from_url(redis_server.url, lane_max_rows=16) as client:
            register(client, slow.directory)
            _await_lane_worker(client.redis)
            jobs = [client.submit("lane-slow", slow.X[i : i + 5]) for i in range(0, 20, 5)]
            deadline = time.monotonic() + 60
            while not all(j.attempts() for j in jobs):
                assert time.monotonic() < deadline, "the lane batch did not start"
                time.sleep(0.1)
            held = list(client.redis.hgetall(Keys().held_index()))
            assert held and sum(int(client.redis.llen(k)) for k in held) == 4
            first.kill()
            second = FaultyWorker(redis_server.url, work_dir, env=FAST_RECOVERY)
            for i, job in zip(range(0, 20, 5), jobs, strict=True):
                out = job.result(timeout_s=120)
                np.testing.assert_array_equal(column(out, "label"), slow.model.predict(slow.X[i : i + 5]))
                assert [a.number for a in job.attempts()] == [1, 2]
            assert client.ledger.counters()["republished"] >= 4
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_purge_drops_lane_jobs(redis_server: RedisServer, iris: Built) -> None:
    with Client.from_url(redis_server.url, lane_max_rows=16) as client:
        register(client, iris.directory)
        _vouch(client.redis)
        for i in range(5):
            client.submit("lane-iris", iris.X[i : i + 2])
        report = client.purge("lane-iris")
        assert report.messages == 5 and report.jobs == 5
        assert _waiting(client.redis) == (0, 0)


def test_a_poison_job_in_a_lane_batch_is_dead_lettered_and_the_rest_answered(
    redis_server: RedisServer, work_dir: Path
) -> None:
    """One lane batch of 21 jobs, one of which kills the worker: after restarts (what a
    supervisor does), the 20 others are answered and the poison job is dead-lettered."""
    built = sklearn_model(work_dir / "lane-poison", "lane-poison", "iris", options={"crash_on": 99.0})
    with Client.from_url(redis_server.url, lane_max_rows=16) as client:
        register(client, built.directory)
        poison_x = built.X[:3].copy()
        poison_x[1, 0] = 99.0
        _vouch(client.redis)
        good = [client.submit("lane-poison", built.X[i : i + 5]) for i in range(0, 100, 10)]
        poison = client.submit("lane-poison", poison_x)
        good += [client.submit("lane-poison", built.X[i : i + 5]) for i in range(5, 105, 10)]
        assert _waiting(client.redis) == (0, 21)
        worker = FaultyWorker(redis_server.url, work_dir, env=FAST_RECOVERY)  # takes all 21 in one batch
        restarts = 0
        try:
            deadline = time.monotonic() + 400
            while poison.status() is Status.PENDING:
                assert time.monotonic() < deadline, "poison job never dead-lettered"
                if not worker.alive():
                    worker.stop()
                    worker = FaultyWorker(redis_server.url, work_dir, env=FAST_RECOVERY)
                    restarts += 1
                time.sleep(0.5)
            with pytest.raises(JobFailed) as info:
                poison.result(timeout_s=10)
            assert info.value.remote_type == "PoisonJob"
            assert [a.number for a in poison.attempts()] == [1, 2, 3]
            assert restarts == 3  # one per attempt of the poison job: it took no other job down twice
            starts = [*range(0, 100, 10), *range(5, 105, 10)]
            for i, job in zip(starts, good, strict=True):
                out = job.result(timeout_s=120)
                np.testing.assert_array_equal(column(out, "label"), built.model.predict(built.X[i : i + 5]))
        finally:
            worker.stop()


def test_the_reconciler_leaves_queued_and_held_lane_jobs_alone_until_their_hold_expires(
    redis_server: RedisServer, iris: Built
) -> None:
    published: list[str] = []
    with Client.from_url(redis_server.url, lane_max_rows=16) as client:
        register(client, iris.directory)
        _vouch(client.redis)
        job = client.submit("lane-iris", iris.X[:3])
        rec = Reconciler(client.redis, client.keys, lambda body, queue, task_id: published.append(task_id), overdue_s=0)
        assert [rec.sweep().queued for _ in range(2)] == [1, 1]  # waiting on the lane
        held = Keys().held("elsewhere:1", 0)  # as a worker's lane thread holds it
        client.redis.rpush(held, client.redis.rpop(lane_list(QUEUE)))  # type: ignore[arg-type]
        client.redis.hset(Keys().held_index(), held, int(time.time() * 1000) + 60_000)
        assert [rec.sweep().queued for _ in range(2)] == [1, 1]  # held by a live worker
        client.redis.hset(Keys().held_index(), held, int(time.time() * 1000) - 1)  # its worker stopped renewing
        assert rec.sweep().suspect == 1 and not published
        assert rec.sweep().republished == [f"{job.id}.0"] == published
        assert not client.redis.hexists(Keys().held_index(), held)


@pytest.mark.slow
def test_chaos_on_the_lane_worker_kills_and_a_redis_restart_lose_no_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scripts.chaos import run_chaos

    monkeypatch.setenv("HETBATCH_LANE_MAX_ROWS", "64")  # every chaos job (1-19 rows) takes the lane
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
