"""``AsyncClient``: the producer client for asyncio services.

Same methods as ``Client``. Validation, Arrow encoding and publishing reuse the sync
client's code in a thread (``asyncio.to_thread``): kombu has no asyncio API, and those
steps are CPU work or one pipelined round trip anyway. Waiting is asyncio-native: one
coroutine drains this client's reply list with ``redis.asyncio`` and wakes the jobs;
a job also reads its result keys now and then, so a missed notice only costs a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any, cast

import pyarrow as pa
import redis.asyncio as aioredis

from hetbatch.producers.client import Client, Job, assemble, status_of
from hetbatch.producers.errors import JobTimeout
from hetbatch.producers.protocol.registry import Spec
from hetbatch.producers.protocol.retention import PurgeReport
from hetbatch.producers.protocol.wire import Status, decode_notice
from hetbatch.producers.settings import ClientSettings

__all__ = ["AsyncClient", "AsyncJob"]

_EARLY_MAX = 4096
_BLPOP_TIMEOUT_S = 1


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
            JobFailed, JobExpired, JobTimeout: as ``Job.result``.
        """
        pack = self._job.pack
        if pack is None:
            return assemble(self.id, self.chunks, await self._client._collect(self, timeout_s))
        data = None if pack.loaded else (await self._client._collect(self, timeout_s))[0]
        return pack.table(self.id, self._job.index, data)

    async def status(self) -> Status:
        """Where the job stands, read from Redis (no waiting)."""
        r, keys = self._client._redis, self._client.keys
        stored = cast(list[bytes | None], await r.mget([keys.result(self.unit, c) for c in range(self.chunks)]))
        recorded = all(v is not None for v in stored) or bool(await r.exists(keys.job(self.unit)))
        return status_of(stored, recorded, self._job.index if self._job.pack is not None else None)

    async def done(self) -> bool:
        return await self.status() in (Status.DONE, Status.FAILED, Status.EXPIRED)

    async def delete(self) -> int:
        """Drop the job's record, inputs and results from Redis now; returns keys deleted."""
        self._client._waiters.pop(self.unit, None)
        return await asyncio.to_thread(self._job.delete)


class AsyncClient:
    """Submit jobs and await their results from asyncio code.

    Use as ``async with AsyncClient.from_url(url) as client: ...``; one client per
    event loop.
    """

    def __init__(self, settings: ClientSettings | None = None) -> None:
        self._sync = Client(settings, listen=False)
        self.settings = self._sync.settings
        self.keys = self._sync.keys
        self.registry = self._sync.registry
        self._redis = aioredis.Redis.from_url(self.settings.redis_url)
        self._reply_key = self.keys.reply(self._sync.id)
        self._waiters: dict[str, dict[int, bytes | None]] = {}
        self._events: dict[str, asyncio.Event] = {}
        self._early: dict[str, dict[int, bytes | None]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._stopping = False

    @classmethod
    def from_url(cls, url: str, **settings: Any) -> AsyncClient:
        """A client for the Redis at ``url`` (password, ACL user and ``rediss://`` work)."""
        return cls(ClientSettings.from_env(redis_url=url, **settings))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the reply listener and release connections."""
        self._stopping = True
        if self._listener is not None:
            # The listener sees the flag within one BLPOP timeout. Cancelling it mid-read
            # is not enough: redis-py can swallow the cancellation and read on.
            done, _ = await asyncio.wait({self._listener}, timeout=_BLPOP_TIMEOUT_S * 3)
            if not done:
                self._listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait_for(self._listener, timeout=_BLPOP_TIMEOUT_S * 3)
            self._listener = None
        await self._redis.aclose()
        await asyncio.to_thread(self._sync.close)

    # -- the same surface as Client ------------------------------------------

    async def spec(self, model: str) -> Spec:
        """The registry entry for ``model``. Raises ModelNotFound."""
        return await asyncio.to_thread(self._sync.spec, model)

    async def submit(self, model: str, data: Any, **options: Any) -> AsyncJob:
        """As ``Client.submit`` (same options and errors)."""
        return self._track(await asyncio.to_thread(self._sync.submit, model, data, **options))

    async def submit_many(self, model: str, datas: Iterable[Any], **options: Any) -> list[AsyncJob]:
        """As ``Client.submit_many`` (same options and errors)."""
        jobs = await asyncio.to_thread(self._sync.submit_many, model, list(datas), **options)
        return [self._track(job) for job in jobs]

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
            table = await job.result(timeout_s=timeout_s)
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
        return self._track(await asyncio.to_thread(self._sync.job, job_id), listen=False)

    async def purge(self, model: str) -> PurgeReport:
        """As ``Client.purge``."""
        return await asyncio.to_thread(self._sync.purge, model)

    # -- internals -----------------------------------------------------------

    def _track(self, job: Job, listen: bool = True) -> AsyncJob:
        if job.unit not in self._waiters:  # the jobs of a pack share their pack's notice
            self._waiters[job.unit] = self._early.pop(job.unit, {})
            self._events[job.unit] = asyncio.Event()
            if len(self._waiters[job.unit]) >= job.chunks:
                self._events[job.unit].set()
        if listen and self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name="hetbatch-replies")
        return AsyncJob(self, job)

    async def _listen(self) -> None:
        while not self._stopping:
            try:
                first = await self._redis.blpop([self._reply_key], timeout=_BLPOP_TIMEOUT_S)
                if first is None:
                    continue
                self._deliver([cast(bytes, first[1])])  # before fetching more: a lone job's caller wakes now
                while more := cast(list[bytes] | None, await self._redis.lpop(self._reply_key, 1024)):
                    self._deliver(more)
            except (aioredis.ConnectionError, aioredis.TimeoutError):
                await asyncio.sleep(0.2)
                continue

    def _deliver(self, batch: list[bytes]) -> None:
        for raw in batch:
            notice = decode_notice(raw)
            # A notice can beat the registration of its job (submit returns after
            # the publish); keep it until the job is tracked.
            target = self._waiters.get(notice.job_id)
            if target is None:
                if len(self._early) >= _EARLY_MAX:  # notices of jobs read from their keys
                    del self._early[next(iter(self._early))]
                target = self._early.setdefault(notice.job_id, {})
            target[notice.chunk] = notice.result
            event = self._events.get(notice.job_id)
            if event is not None:
                event.set()

    async def _collect(self, job: AsyncJob, timeout_s: float | None) -> dict[int, bytes]:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        unit = job.unit
        payloads = self._waiters.setdefault(unit, {})
        event = self._events.setdefault(unit, asyncio.Event())
        while True:
            missing = [c for c in range(job.chunks) if payloads.get(c) is None]
            if missing:
                stored = cast(list[bytes | None], await self._redis.mget([self.keys.result(unit, c) for c in missing]))
                payloads.update({c: v for c, v in zip(missing, stored, strict=True) if v is not None})
            if all(payloads.get(c) is not None for c in range(job.chunks)):
                self._waiters.pop(unit, None)
                self._events.pop(unit, None)
                return {c: v for c, v in payloads.items() if v is not None}
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                done = job.chunks - len(missing)
                raise JobTimeout(job.id, f"{done}/{job.chunks} chunks done after {timeout_s} s")
            event.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), timeout=1.0 if remaining is None else min(1.0, remaining))


async def _aiter(items: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
