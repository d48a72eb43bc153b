"""``AsyncClient``: the producer client for asyncio services.

Same methods as ``Client``. Validation, Arrow encoding and publishing reuse the sync
client's code in a thread (``asyncio.to_thread``): kombu has no asyncio API, and those
steps are CPU work or one round trip anyway. Waiting is asyncio-native and shares its
logic with ``Client`` (``producers.replies``): one coroutine drains this client's reply
list with ``redis.asyncio`` and wakes the jobs; a job also reads its result keys now
and then, so a missed notice only costs a second.

Connections come from a bounded pool that waits for a free connection
(``BlockingConnectionPool``): many concurrent awaits queue for the pool instead of
failing with ``MaxConnectionsError``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any

import pyarrow as pa
import redis.asyncio as aioredis

from hetbatch.producers.client import Client
from hetbatch.producers.jobs import FINISHED, Job, outputs, refuse_deleted
from hetbatch.producers.protocol.connect import async_connect
from hetbatch.producers.protocol.ledger import Attempt
from hetbatch.producers.protocol.registry import Spec
from hetbatch.producers.protocol.retention import PurgeReport
from hetbatch.producers.protocol.wire import Status
from hetbatch.producers.replies import (
    Blpop,
    Exists,
    Inbox,
    Lpop,
    Mget,
    Step,
    arun,
    collect_steps,
    listen_steps,
    status_steps,
)
from hetbatch.producers.settings import ClientSettings

__all__ = ["AsyncClient", "AsyncJob"]

_CLOSE_WAIT_S = 3.0  # the listener sees the stop flag within one BLPOP timeout (1 s)


class AsyncJob:
    """A submitted job; ``await job.result()`` waits for its chunks without blocking the loop."""

    def __init__(self, client: AsyncClient, job: Job) -> None:
        self.id = job.id
        self.model = job.model
        self.chunks = job.chunks
        self.rows = job.rows
        self.unit = job.unit
        self._client = client
        self._job = job

    def __repr__(self) -> str:
        return f"AsyncJob(id={self.id!r}, model={self.model!r}, chunks={self.chunks}, rows={self.rows})"

    async def result(self, timeout_s: float | None = 300.0) -> pa.Table:
        """The job's outputs, as ``Job.result``.

        Raises:
            JobFailed, JobExpired, JobLost, JobDeleted, JobTimeout: as ``Job.result``.
        """
        job = self._job
        refuse_deleted(job)
        loaded = job.pack is not None and job.pack.loaded
        return outputs(job, None if loaded else await self._client._collect(job, timeout_s))

    async def status(self) -> Status:
        """Where the job stands, read from Redis (no waiting)."""
        return await arun(status_steps(self._client.keys, self._job), self._client._do)

    async def done(self) -> bool:
        """Whether the job finished for good: done, failed, expired or lost (as ``Job.done``)."""
        return await self.status() in FINISHED

    async def attempts(self) -> list[Attempt]:
        """As ``Job.attempts``."""
        return await asyncio.to_thread(self._job.attempts)

    async def delete(self) -> int:
        """As ``Job.delete``: end the job for good; returns keys deleted."""
        return await asyncio.to_thread(self._job.delete)


class AsyncClient:
    """Submit jobs and await their results from asyncio code.

    Use as ``async with AsyncClient.from_url(url) as client: ...``; one client per
    event loop.
    """

    def __init__(self, settings: ClientSettings | None = None) -> None:
        settings = settings or ClientSettings.from_env()
        # Jobs are tracked in this inbox by the sync client before they are published;
        # the coroutine below fills it. asyncio.Event binds to the loop on first wait.
        self._inbox = Inbox(asyncio.Event)
        self._sync = Client(settings, listen=False, inbox=self._inbox)
        self.settings = self._sync.settings
        self.keys = self._sync.keys
        self.registry = self._sync.registry
        self._redis = async_connect(
            self.settings.redis_url,
            max_connections=self.settings.async_max_connections,
            timeout_s=self.settings.pool_timeout_s,
        )
        self._reply_key = self._sync.replies.reply_key
        self._listener: asyncio.Task[None] | None = None
        self._stopping = False

    @classmethod
    def from_url(cls, url: str, **settings: Any) -> AsyncClient:
        """A client for the Redis at ``url`` (password, ACL user, ``rediss://`` and
        ``sentinel://``, ``producers.protocol.sentinel``, work)."""
        return cls(ClientSettings.from_env(redis_url=url, **settings))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the reply listener and release connections."""
        self._stopping = True
        if self._listener is not None:
            # Cancelling the listener mid-read is not enough: redis-py can swallow the
            # cancellation and read on. It sees the flag within one BLPOP timeout.
            done, _ = await asyncio.wait({self._listener}, timeout=_CLOSE_WAIT_S)
            if not done:
                self._listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait_for(self._listener, timeout=_CLOSE_WAIT_S)
            self._listener = None
            with contextlib.suppress(aioredis.RedisError):
                await self._redis.delete(self._reply_key)
        await self._redis.aclose()
        await asyncio.to_thread(self._sync.close)

    # -- the same surface as Client ------------------------------------------

    async def spec(self, model: str) -> Spec:
        """The registry entry for ``model``. Raises ModelNotFound, BrokerError."""
        return await asyncio.to_thread(self._sync.spec, model)

    async def submit(self, model: str, data: Any, **options: Any) -> AsyncJob:
        """As ``Client.submit`` (same options and errors)."""
        self._listen()
        return AsyncJob(self, await asyncio.to_thread(self._sync.submit, model, data, **options))

    async def submit_many(self, model: str, datas: Iterable[Any], **options: Any) -> list[AsyncJob]:
        """As ``Client.submit_many`` (same options and errors)."""
        self._listen()
        jobs = await asyncio.to_thread(self._sync.submit_many, model, list(datas), **options)
        return [AsyncJob(self, job) for job in jobs]

    async def predict(self, model: str, data: Any, *, timeout_s: float | None = 300.0, **options: Any) -> pa.Table:
        """Submit and wait: the outputs of ``model`` on ``data`` as one table."""
        job = await self.submit(model, data, **options)
        return await job.result(timeout_s=timeout_s)

    async def map(
        self,
        model: str,
        batches: Iterable[Any] | AsyncIterable[Any],
        *,
        max_in_flight: int = 4,
        timeout_s: float | None = 300.0,
        keep_results: bool = False,
        **options: Any,
    ) -> AsyncIterator[tuple[Any, pa.Table]]:
        """As ``Client.map``: ``(batch, outputs)`` in input order, at most
        ``max_in_flight`` jobs ahead of the reader, results deleted once read."""
        window: deque[tuple[Any, AsyncJob]] = deque()

        async def take() -> tuple[Any, pa.Table]:
            done, job = window.popleft()
            try:
                table = await job.result(timeout_s=timeout_s)
            finally:  # as Client.map: a failed job goes too
                if not keep_results:
                    await job.delete()
            return done, table

        async for batch in _aiter(batches):
            if len(window) >= max_in_flight:
                yield await take()
            window.append((batch, await self.submit(model, batch, **options)))
        while window:
            yield await take()

    async def job(self, job_id: str) -> AsyncJob:
        """Re-attach to a job submitted earlier. Raises JobFailed when unknown."""
        return AsyncJob(self, await asyncio.to_thread(self._sync.job, job_id))

    async def purge(self, model: str) -> PurgeReport:
        """As ``Client.purge``."""
        return await asyncio.to_thread(self._sync.purge, model)

    # -- internals -----------------------------------------------------------

    def _listen(self) -> None:
        if self._listener is None and not self._stopping:
            steps = listen_steps(self._inbox, self._reply_key, lambda: self._stopping)
            self._listener = asyncio.create_task(arun(steps, self._do), name="hetbatch-replies")

    async def _collect(self, job: Job, timeout_s: float | None) -> dict[int, bytes]:
        return await arun(collect_steps(self._inbox, self.keys, job, timeout_s), self._do)

    async def _do(self, step: Step) -> Any:
        """Perform one step of ``producers.replies`` with ``redis.asyncio``."""
        r = self._redis
        if isinstance(step, Mget):
            return await r.mget(step.keys)
        if isinstance(step, Exists):
            return await r.exists(step.key)
        if isinstance(step, Blpop):
            return await r.blpop([step.key], timeout=step.timeout_s)
        if isinstance(step, Lpop):
            return await r.lpop(step.key, step.count)
        signal = self._inbox.signal(step.unit) if step.unit is not None else None
        if isinstance(signal, asyncio.Event):
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(signal.wait(), timeout=step.seconds)
            signal.clear()
        else:
            await asyncio.sleep(step.seconds)
        return None


async def _aiter(items: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
