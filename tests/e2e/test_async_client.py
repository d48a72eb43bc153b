"""AsyncClient against the real worker: every result equals the model called in-process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from hetbatch.producers import JobFailed, ModelNotFound, SchemaMismatch, Status
from hetbatch.producers.aio import AsyncClient
from tests.kit.helpers import WorkerProcess, column, register
from tests.kit.models import Built, sklearn_model


@pytest.fixture(scope="module")
def wine(work_dir: Path) -> Built:
    return sklearn_model(work_dir / "aio-wine", "aio-wine", "wine", nan="pass")  # NaN reaches the model


@pytest.fixture()
def ref(redis_url: str, cpu_worker: WorkerProcess, wine: Built) -> str:
    from hetbatch.producers import Client

    with Client.from_url(redis_url) as client:
        return register(client, wine.directory)


def test_predict_and_concurrent_submits_equal_in_process(redis_url: str, ref: str, wine: Built) -> None:
    async def main() -> None:
        async with AsyncClient.from_url(redis_url) as client:
            whole = await client.predict(ref, wine.X, timeout_s=120)
            np.testing.assert_allclose(column(whole, "probabilities"), wine.model.predict_proba(wine.X), atol=1e-6)
            pieces = [wine.X[i : i + 17] for i in range(0, len(wine.X), 17)]
            jobs = await asyncio.gather(*(client.submit(ref, p, chunk_rows=5) for p in pieces))
            tables = await asyncio.gather(*(j.result(timeout_s=120) for j in jobs))
            for piece, table in zip(pieces, tables, strict=True):
                np.testing.assert_array_equal(column(table, "label"), wine.model.predict(piece))
            assert {await j.status() for j in jobs} == {Status.DONE}

    asyncio.run(main())


def test_submit_many_and_reattaching_by_id(redis_url: str, ref: str, wine: Built) -> None:
    async def main() -> None:
        async with AsyncClient.from_url(redis_url) as client:
            pieces = [wine.X[i : i + 1 + i % 4] for i in range(0, 60, 3)]
            jobs = await client.submit_many(ref, pieces)
            for job, piece in zip(jobs, pieces, strict=True):
                np.testing.assert_array_equal(
                    column(await job.result(timeout_s=120), "label"), wine.model.predict(piece)
                )
        async with AsyncClient.from_url(redis_url) as other:
            again = await other.job(jobs[0].id)
            np.testing.assert_array_equal(
                column(await again.result(timeout_s=60), "label"), wine.model.predict(pieces[0])
            )
            assert await again.delete() >= 2
            assert await again.status() is Status.LOST

    asyncio.run(main())


def test_map_streams_in_order_from_sync_and_async_iterables(redis_url: str, ref: str, wine: Built) -> None:
    batches = [wine.X[i : i + 25] for i in range(0, len(wine.X), 25)]

    async def agen() -> AsyncIterator[np.ndarray]:
        for b in batches:
            await asyncio.sleep(0)
            yield b

    async def main() -> None:
        async with AsyncClient.from_url(redis_url) as client:
            for source in (batches, agen()):
                seen = []
                async for batch, out in client.map(ref, source, max_in_flight=2):
                    np.testing.assert_array_equal(column(out, "label"), wine.model.predict(batch))
                    seen.append(len(batch))
                assert seen == [len(b) for b in batches]

    asyncio.run(main())


def test_errors_are_the_sync_clients(redis_url: str, ref: str, wine: Built) -> None:
    async def main() -> None:
        async with AsyncClient.from_url(redis_url) as client:
            with pytest.raises(ModelNotFound):
                await client.submit("no-such-model", wine.X)
            with pytest.raises(SchemaMismatch):
                await client.submit(ref, wine.X[:, :5])
            bad = wine.X.copy()
            bad[3, 2] = np.nan
            job = await client.submit(ref, bad)
            try:
                expected = wine.model.predict(bad)
            except ValueError:  # this sklearn rejects NaN: so must the worker, as a typed remote error
                with pytest.raises(JobFailed) as failed:
                    await job.result(timeout_s=120)
                assert failed.value.remote_type
            else:  # this sklearn's forests route NaN: the answer must be the in-process one
                np.testing.assert_array_equal(column(await job.result(timeout_s=120), "label"), expected)

    asyncio.run(main())


def test_a_thousand_concurrent_predicts_all_answered_right(redis_url: str, ref: str, wine: Built) -> None:
    """More awaits than pooled connections: they wait for a free connection (a bounded
    BlockingConnectionPool) instead of failing with MaxConnectionsError."""
    pieces = [wine.X[i % 150 : i % 150 + 1 + i % 7] for i in range(1000)]

    async def main() -> None:
        async with AsyncClient.from_url(redis_url, async_max_connections=16) as client:
            tables = await asyncio.gather(*(client.predict(ref, p, timeout_s=240) for p in pieces))
        for piece, table in zip(pieces, tables, strict=True):
            np.testing.assert_array_equal(column(table, "label"), wine.model.predict(piece))

    asyncio.run(main())
