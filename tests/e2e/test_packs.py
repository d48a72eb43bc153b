"""Packs: the small jobs of one submit_many task share one record, one stored result and
one notice, yet each keeps its own id, result, status and error."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from hetbatch.producers import Client, JobFailed, Status
from hetbatch.producers.aio import AsyncClient
from tests.kit.helpers import WorkerProcess, column, register
from tests.kit.models import Built, sklearn_model


@pytest.fixture(scope="module")
def digits(work_dir: Path) -> Built:
    return sklearn_model(work_dir / "pack-digits", "pack-digits", "digits", kind="logreg")


@pytest.fixture(scope="module")
def worker(private_redis: str, work_dir: Path, digits: Built) -> Iterator[WorkerProcess]:
    with Client.from_url(private_redis) as c:
        register(c, digits.directory)
    proc = WorkerProcess(private_redis, work_dir)
    yield proc
    proc.stop()


def _pieces(built: Built, jobs: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [built.X[s : s + n] for s, n in zip(rng.integers(0, 1700, jobs), rng.integers(1, 17, jobs))]


def _calls(r: redis.Redis) -> int:
    return sum(int(v["calls"]) for v in r.info("commandstats").values())


def test_a_thousand_small_jobs_cost_under_two_redis_commands_each_and_match_in_process(
    private_redis: str, worker: WorkerProcess, digits: Built
) -> None:
    pieces = _pieces(digits, 1000)
    r = redis.Redis.from_url(private_redis)
    with Client.from_url(private_redis) as client:
        client.predict("pack-digits", digits.X[:2], timeout_s=60)  # model loaded, spec cached
        before = _calls(r)
        jobs = client.submit_many("pack-digits", pieces, pack_rows=4096)
        tables = [job.result(timeout_s=60) for job in jobs]
        commands = _calls(r) - before
    assert len({job.id for job in jobs}) == 1000
    assert len({job.unit for job in jobs}) == 3  # ~8,500 rows in packs of at most 4,096
    for piece, table in zip(pieces, tables, strict=True):
        np.testing.assert_array_equal(column(table, "label"), digits.model.predict(piece))
        np.testing.assert_allclose(column(table, "probabilities"), digits.model.predict_proba(piece), atol=1e-6)
    # Producer, worker (Celery's own polling and acks included) and reader, all together.
    assert commands / len(jobs) < 2, f"{commands} Redis commands for {len(jobs)} jobs"


def test_each_job_of_a_pack_keeps_its_own_error_status_and_handle(
    private_redis: str, worker: WorkerProcess, digits: Built
) -> None:
    pieces = [digits.X[i : i + 3].copy() for i in range(0, 60, 3)]
    pieces[7][1, 5] = np.nan  # rejected by the worker before the merged call: the others go on
    with Client.from_url(private_redis) as client:
        jobs = client.submit_many("pack-digits", pieces)
        assert len({job.unit for job in jobs}) == 1
        for i, (job, piece) in enumerate(zip(jobs, pieces, strict=True)):
            if i == 7:
                with pytest.raises(JobFailed, match="NaN") as info:
                    job.result(timeout_s=60)
                assert info.value.job_id == job.id
            else:
                np.testing.assert_array_equal(column(job.result(timeout_s=60), "label"), digits.model.predict(piece))
        statuses = [job.status() for job in jobs]
        assert statuses == [Status.FAILED if i == 7 else Status.DONE for i in range(len(jobs))]
        assert [a.number for a in jobs[3].attempts()] == [1]

    with Client.from_url(private_redis) as other:  # another process re-attaches by job id
        again = other.job(jobs[4].id)
        assert (again.rows, again.unit) == (3, jobs[4].unit)
        np.testing.assert_array_equal(column(again.result(timeout_s=10), "label"), digits.model.predict(pieces[4]))
        with pytest.raises(JobFailed):
            other.job(jobs[7].id).result(timeout_s=10)
        with pytest.raises(JobFailed, match="no record"):
            other.job(f"{jobs[0].unit}-999")


def test_deleting_a_packed_job_drops_its_pack_but_results_read_before_stay(
    private_redis: str, worker: WorkerProcess, digits: Built
) -> None:
    pieces = [digits.X[i : i + 2] for i in range(0, 20, 2)]
    with Client.from_url(private_redis) as client:
        jobs = client.submit_many("pack-digits", pieces)
        first = jobs[0].result(timeout_s=60)
        assert jobs[0].delete() >= 2  # the pack's record and stored result
        assert jobs[5].status() is Status.LOST
        np.testing.assert_array_equal(column(first, "label"), digits.model.predict(pieces[0]))
        # Decoded once for the pack: the other jobs' results are still at hand.
        np.testing.assert_array_equal(column(jobs[5].result(timeout_s=5), "label"), digits.model.predict(pieces[5]))


def test_the_async_client_reads_packed_jobs(private_redis: str, worker: WorkerProcess, digits: Built) -> None:
    pieces = _pieces(digits, 50)

    async def go() -> list[np.ndarray]:
        async with AsyncClient.from_url(private_redis) as client:
            jobs = await client.submit_many("pack-digits", pieces)
            return [column(await job.result(timeout_s=60), "label") for job in jobs]

    for piece, labels in zip(pieces, asyncio.run(go()), strict=True):
        np.testing.assert_array_equal(labels, digits.model.predict(piece))


def test_a_pack_result_lists_its_jobs_in_order_around_an_empty_one() -> None:
    """A hostile producer's empty job shares its row offset with the next job; each job
    must still get its own rows or its own error."""
    import pyarrow as pa

    from hetbatch.producers.errors import RemoteError
    from hetbatch.producers.protocol.wire import Item, TaskEnvelope, decode_pack_result
    from hetbatch.worker.results import Done, outcomes_of

    a, empty, c = Item("p-0", 0, 2), Item("p-1", 0, 0), Item("p-2", 0, 1)
    env = TaskEnvelope(model="m", version="1", items=(a, empty, c), payload_b64="", pack="p")
    run = Done(0, [a, c], table=pa.table({"y": [1, 2, 3]}))  # a and c are contiguous rows
    error = Done(2, [empty], error=RemoteError("SchemaMismatch", "the job has no rows"))
    (outcome,) = outcomes_of(env, [error, run], max_bytes=1 << 20)
    first, second, third = decode_pack_result(bytes(outcome.result))
    assert isinstance(first, pa.Table) and first.column("y").to_pylist() == [1, 2]
    assert isinstance(second, RemoteError) and second.type == "SchemaMismatch"
    assert isinstance(third, pa.Table) and third.column("y").to_pylist() == [3]


def test_purge_counts_every_job_of_a_queued_pack(private_redis: str) -> None:
    """A pack's envelope lists its sizes, not its job ids: purge still finds every job."""
    from hetbatch.producers.protocol.keys import Keys
    from hetbatch.producers.protocol.kombu import celery_message
    from hetbatch.producers.protocol.retention import purge_model
    from hetbatch.producers.protocol.wire import TASK_NAME, Item, TaskEnvelope

    items = tuple(Item(f"purge-pack-{i}", 0, 2) for i in range(7))
    env = TaskEnvelope("purge-me", "1", items, payload_key="hb:in:purge-pack:0", pack="purge-pack")
    r = redis.Redis.from_url(private_redis)
    r.lpush("purge.cpu", celery_message(TASK_NAME, [env.to_dict()], "purge.cpu", 0, env.describe()))
    report = purge_model(r, Keys("hb"), "purge-me", "purge.cpu")
    assert (report.messages, report.jobs) == (1, 7)
    assert r.llen("purge.cpu") == 0
