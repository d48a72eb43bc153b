"""The producer client: submit Arrow jobs to the queues and read their results.

``Client`` is the API. What it does is done by: ``publisher`` (one all-or-nothing round
trip with retries), ``routing`` (queue, lane or host queue), ``protocol.transport``
(inline, Redis key or shared-memory file), ``replies`` (the reply listener and the
waiting) and ``jobs`` (``Job`` and reading results).
"""

from __future__ import annotations

import json
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any, cast

import numpy as np
import pyarrow as pa
import redis
from celery import Celery

from hetbatch.producers.chunking import arrays_bytes, chunk_bounds
from hetbatch.producers.errors import BrokerError, JobDeleted, JobFailed, RemoteError, SchemaMismatch
from hetbatch.producers.jobs import Job, Pack
from hetbatch.producers.protocol.connect import connect
from hetbatch.producers.protocol.ensemble import EnsembleSpec
from hetbatch.producers.protocol.keys import Keys
from hetbatch.producers.protocol.kombu import LANE_PRIORITY
from hetbatch.producers.protocol.ledger import Ledger
from hetbatch.producers.protocol.registry import ModelSpec, Registry, Spec, parse_ref
from hetbatch.producers.protocol.retention import PurgeReport, purge_model
from hetbatch.producers.protocol.schema import CastRule, arrays_to_table, to_arrays, to_table
from hetbatch.producers.protocol.transport import Placed, Transport
from hetbatch.producers.protocol.wire import Item, TaskEnvelope, encode_table
from hetbatch.producers.publisher import Publisher, make_producer_app, priority_level, safe_url
from hetbatch.producers.replies import Inbox, Replies
from hetbatch.producers.routing import Router
from hetbatch.producers.settings import ClientSettings

__all__ = ["Client", "Job", "Pack", "make_producer_app"]

_FLUSH_BYTES = 1 << 20  # a big job's chunks go out in round trips of about this many bytes
_PACK_BYTES = 8 << 20  # most input bytes in one pack of small jobs


class Client:
    """Submit jobs to hetbatch workers through Redis and fetch their results.

    A client opens one Redis connection pool and, on first submit, one background
    thread that drains the client's reply list: no per-job subscription.
    """

    def __init__(
        self, settings: ClientSettings | None = None, *, listen: bool = True, inbox: Inbox | None = None
    ) -> None:
        """Open the Redis pool (no connection is made yet).

        Args:
            settings: connection and job shaping (default: from ``HETBATCH_*`` variables).
            listen: drain the reply list in a thread; without it results are read from
                their keys.
            inbox: track jobs in this inbox (``AsyncClient``'s, which listens itself).
        """
        self.settings = s = settings or ClientSettings.from_env()
        self.keys = Keys(s.prefix)
        self.redis = connect(s.redis_url)
        self.registry = Registry(self.redis, self.keys)
        self.ledger = Ledger(self.redis, self.keys)
        self.id = uuid.uuid4().hex
        self.transport = Transport(
            self.keys, s.shm_dir, s.max_payload_bytes, inline_max_bytes=s.inline_max_bytes, ttl_s=s.input_ttl_s
        )
        self.publisher = Publisher(
            self.redis, self.keys, self.ledger, self.transport, retries=s.publish_retries, input_ttl_s=s.input_ttl_s,
            result_ttl_s=s.result_ttl_s, trace_submits=s.tracing, replicas=(s.wait_replicas, s.wait_timeout_ms),
        )  # fmt: skip
        self.router = Router(self.redis, self.keys, shm_dir=s.shm_dir, ttl_s=s.registry_ttl_s)
        self._reply_key = self.keys.reply(self.id)
        self.replies = Replies(
            self.redis, self.keys, self.ledger, self.transport, self._reply_key, s.redis_url, listen=listen, inbox=inbox
        )
        self._celery: Celery | None = None
        self._specs: dict[str, tuple[float, Spec]] = {}

    @property
    def _app(self) -> Celery:
        """A Celery app on the same broker, for Celery-level operations (built on first use)."""
        if self._celery is None:
            self._celery = make_producer_app(self.settings.redis_url)
        return self._celery

    @classmethod
    def from_url(cls, url: str, **settings: Any) -> Client:
        """A client for the Redis at ``url`` (``redis://[user:password@]host:port/db`` or ``rediss://``)."""
        return cls(ClientSettings.from_env(redis_url=url, **settings))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the reply listener and release connections."""
        self.replies.close()
        self.redis.close()
        if self._celery is not None:
            self._celery.close()

    def spec(self, model: str) -> Spec:
        """The registry entry for ``model`` (``name`` cached for ``registry_ttl_s``).

        Raises:
            ModelNotFound: unknown name or version.
            BrokerError: Redis cannot be reached.
        """
        now = time.monotonic()
        hit = self._specs.get(model)
        if hit is not None and (now - hit[0] < self.settings.registry_ttl_s or "@" in model):
            return hit[1]
        try:
            spec = self.registry.get(model)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise BrokerError(f"Redis at {safe_url(self.redis)} unreachable: {exc}; is it running?") from exc
        self._specs[model] = (now, spec)
        return spec

    def submit(
        self,
        model: str,
        data: Any,
        *,
        chunk_rows: int | None = None,
        chunk_bytes: int | None = None,
        cast: CastRule = "safe",
        priority: str = "normal",
        deadline_s: float | None = None,
    ) -> Job:
        """Validate ``data`` against the model's inputs and enqueue it in chunks.

        Args:
            model: ``name`` (latest version) or ``name@version``.
            data: pyarrow Table/RecordBatch, pandas DataFrame, dict of numpy arrays,
                or a 2-D numpy array for single-input models.
            chunk_rows: most rows per task (default ``settings.chunk_rows``).
            chunk_bytes: most bytes per task, of input or expected output (default
                ``settings.chunk_bytes``; ``producers.chunking``).
            cast: how far dtypes may be converted: ``safe`` (lossless) by default.
            priority: ``high``, ``normal`` or ``low``.
            deadline_s: seconds from now after which the job must not run.

        An ensemble's chunks go to its members' queues (``producers.protocol.ensemble``);
        workers fuse the members' results under this job's id.

        Raises:
            ModelNotFound, SchemaMismatch.
            PayloadTooLarge: one row alone is over ``max_payload_bytes`` (naming the row).
            BrokerError: Redis unreachable; every round trip is all-or-nothing, so each
                chunk is either published whole or not at all.
        """
        spec = self.spec(model)
        level = priority_level(priority)
        table = self._prepare(spec, data, cast)
        bounds = self._bounds(spec, table, chunk_rows, chunk_bytes)
        job = Job(self.replies, uuid.uuid4().hex, spec.ref, len(bounds), table.num_rows)
        deadline = time.time() + deadline_s if deadline_s is not None else None
        with self.publisher.submitting({"hetbatch.model": spec.ref, "hetbatch.job": job.id}) as batch:
            self.publisher.record(batch, job.id, job.model, job.chunks, job.rows)
            if isinstance(spec, EnsembleSpec):  # members' tasks on their own queues; workers fuse
                self.replies.track(job.id, job.chunks)
                try:
                    parts = [table.slice(start, rows) for start, rows in bounds]
                    self.publisher.ensemble(batch, spec, job.id, parts, self.spec, self._reply_key, deadline, level)
                except Exception:
                    self.replies.untrack(job.id)
                    raise
                return job
            queue = self._route(spec)
            # A big job goes through shared memory while a worker on this host takes it.
            host = self.router.host_queue(queue) if table.nbytes >= self.settings.shm_min_bytes else None
            self.replies.track(job.id, job.chunks)
            lane = job.chunks == 1 and level == LANE_PRIORITY and 0 < job.rows <= self.settings.lane_max_rows
            lane = lane and host is None and self.router.lane_drained(queue)
            buffered = 0
            try:
                for chunk, (start, rows) in enumerate(bounds):
                    part = table.slice(start, rows)
                    payload, size = self.transport.place_table(part, job.id, chunk, batch, to_shm=host is not None)
                    if payload.payload_shm is None:  # through Redis after all: the folder is full
                        host = None
                    env = self._envelope(spec, [Item(job.id, chunk, part.num_rows)], payload, deadline)
                    self.publisher.enqueue(batch, host or queue, env, level, lane=lane)
                    buffered += size
                    if buffered >= _FLUSH_BYTES:  # let workers start on early chunks of a big job
                        self.publisher.send(batch)
                        buffered = 0
                self.publisher.send(batch)
            except Exception:
                self.replies.untrack(job.id)
                self.transport.drop(self.redis, [], self.transport.inputs((job.id, c) for c in range(len(bounds)))[1])
                raise
            return job

    def submit_many(
        self,
        model: str,
        datas: Iterable[Any],
        *,
        cast: CastRule = "safe",
        priority: str = "normal",
        pack_rows: int | None = None,
        deadline_s: float | None = None,
    ) -> list[Job]:
        """Submit many small jobs, packed several to a task message.

        Each job keeps its own id, result and error; packing only saves broker
        messages (the per-message cost dominates small jobs). Everything goes out in
        one all-or-nothing round trip. A job heavier than ``settings.chunk_bytes`` (input
        or expected output) is not packed: it goes as a job of its own, cut into chunks
        like ``submit``'s, after the packs.

        Raises:
            ModelNotFound, SchemaMismatch (naming the job's position).
            PayloadTooLarge: one row alone is over ``max_payload_bytes``.
            BrokerError: Redis unreachable: none of the jobs was published.
        """
        spec = self.spec(model)
        level = priority_level(priority)
        if isinstance(spec, EnsembleSpec):
            # Each ensemble job fans out to its members already; packing would gain nothing.
            return [self.submit(model, d, cast=cast, priority=priority, deadline_s=deadline_s) for d in datas]
        # Big packs: each task costs ~1 ms of worker CPU whatever its size (with 4,096-row
        # packs the model ran at half its in-process rate), and the worker cuts a pack
        # into calls of its own size. Bounded by bytes too, for models with wide inputs.
        limit = pack_rows or self.settings.chunk_rows
        queue = self._route(spec)
        deadline = time.time() + deadline_s if deadline_s is not None else None
        jobs: list[Job | None] = []
        alone: list[tuple[int, dict[str, np.ndarray]]] = []  # (position, arrays) of the heavy jobs
        out_row = spec.output_bytes
        pack: list[dict[str, np.ndarray]] = []
        sizes: list[int] = []
        with self.publisher.submitting({"hetbatch.model": spec.ref}) as batch:
            packs: list[str] = []
            current = Pack(uuid.uuid4().hex)
            rows_now = bytes_now = 0

            def flush() -> None:
                nonlocal current, rows_now, bytes_now
                if not sizes:
                    return
                pack_id = current.id
                names = list(pack[0])
                merged = {n: np.concatenate([p[n] for p in pack]) if len(pack) > 1 else pack[0][n] for n in names}
                blob = encode_table(arrays_to_table(merged))
                items = [Item(f"{pack_id}-{i}", 0, rows) for i, rows in enumerate(sizes)]
                self.publisher.record(batch, pack_id, spec.ref, 1, rows_now, sizes)
                payload = self.transport.place(blob, pack_id, 0, batch)
                self.publisher.enqueue(batch, queue, self._envelope(spec, items, payload, deadline, pack_id), level)
                packs.append(pack_id)
                pack.clear()
                sizes.clear()
                rows_now = bytes_now = 0
                current = Pack(uuid.uuid4().hex)

            try:
                for position, data in enumerate(datas):
                    try:
                        arrays = to_arrays(data, spec.inputs, cast=cast)
                    except SchemaMismatch as exc:
                        raise SchemaMismatch(f"job #{position} of submit_many: {exc}") from exc
                    rows = len(next(iter(arrays.values())))
                    if rows == 0:
                        raise SchemaMismatch(f"job #{position} of submit_many has no rows; nothing to predict")
                    size = max(arrays_bytes(arrays), rows * out_row)
                    if size > self.settings.chunk_bytes:
                        alone.append((position, arrays))
                        jobs.append(None)
                        continue
                    if rows_now + rows > limit or bytes_now + size > _PACK_BYTES:
                        flush()
                    if not sizes:
                        self.replies.track(current.id, 1)
                    jobs.append(Job(self.replies, f"{current.id}-{len(sizes)}", spec.ref, 1, rows, current, len(sizes)))
                    pack.append(arrays)
                    sizes.append(rows)
                    rows_now += rows
                    bytes_now += size
                flush()
                self.publisher.send(batch)
            except Exception:
                for pack_id in {*packs, current.id}:
                    self.replies.untrack(pack_id)
                raise
        for position, arrays in alone:
            jobs[position] = self.submit(model, arrays, cast="no", priority=priority, deadline_s=deadline_s)
        return [job for job in jobs if job is not None]

    def predict(self, model: str, data: Any, *, timeout_s: float | None = 300.0, **options: Any) -> pa.Table:
        """Submit and wait: the outputs of ``model`` on ``data`` as one table."""
        return self.submit(model, data, **options).result(timeout_s=timeout_s)

    def map(
        self,
        model: str,
        batches: Iterable[Any],
        *,
        max_in_flight: int = 4,
        timeout_s: float | None = 300.0,
        keep_results: bool = False,
        **options: Any,
    ) -> Iterator[tuple[Any, pa.Table]]:
        """Stream ``(batch, outputs)`` pairs in input order, with at most ``max_in_flight``
        jobs submitted and unread: memory stays bounded whatever the input's size. Each
        job is deleted from Redis once read or failed (``Job.delete``, unless
        ``keep_results``), so Redis holds no more than the window either (about five
        keys per job in flight: docs/reliability.md).

        Raises:
            the errors of ``submit`` and ``Job.result``, at the batch they concern.
        """
        window: deque[tuple[Any, Job]] = deque()

        def take() -> tuple[Any, pa.Table]:
            done, job = window.popleft()
            try:
                table = job.result(timeout_s=timeout_s)
            finally:  # a failed job's error result goes too: the error is raised here
                if not keep_results:
                    job.delete()
            return done, table

        for batch in batches:
            if len(window) >= max_in_flight:
                yield take()
            window.append((batch, self.submit(model, batch, **options)))
        while window:
            yield take()

    def purge(self, model: str) -> PurgeReport:
        """End every job of ``model`` (all versions) for good: its queued tasks and every
        key of its jobs go now, and a task a worker already holds is never run or
        answered; reading such a job raises ``JobDeleted`` (``producers.protocol.retention``).

        Raises:
            ModelNotFound: unknown name.
        """
        name, _ = parse_ref(model)
        spec = self.registry.model(name)
        ttl_s = max(self.settings.input_ttl_s, self.settings.result_ttl_s)
        return purge_model(self.redis, self.keys, name, spec.queue, self.settings.shm_dir, ttl_s=ttl_s)

    def job(self, job_id: str) -> Job:
        """Re-attach to a job submitted earlier (by this or another process).

        Raises:
            JobDeleted: the job was deleted or purged.
            JobFailed: no record of that job (unknown id or expired).
        """
        unit, _, index = job_id.rpartition("-") if "-" in job_id else (job_id, "", "")
        raw, ended = cast(list[bytes | None], self.redis.mget([self.keys.job(unit), self.keys.gone(unit)]))
        if raw is None and ended is not None:
            raise JobDeleted(job_id, f"it was {ended.decode(errors='replace')} (Job.delete or Client.purge)")
        meta = json.loads(raw) if raw is not None else {}
        sizes = meta.get("pack") or []
        if raw is None or (index and not (index.isdigit() and int(index) < len(sizes))):
            raise JobFailed(job_id, RemoteError("JobLost", "no record of this job: unknown id or expired"))
        if index:
            return Job(self.replies, job_id, str(meta["model"]), 1, int(sizes[int(index)]), Pack(unit), int(index))
        return Job(self.replies, job_id, str(meta["model"]), int(meta["chunks"]), int(meta["rows"]))

    # -- internals -----------------------------------------------------------

    def _prepare(self, spec: Spec, data: Any, cast: CastRule) -> pa.Table:
        table = to_table(data, spec.inputs, cast=cast)
        if table.num_rows == 0:
            raise SchemaMismatch("the input has no rows; nothing to predict")
        return table

    def _bounds(
        self, spec: Spec, table: pa.Table, chunk_rows: int | None, chunk_bytes: int | None
    ) -> list[tuple[int, int]]:
        """(start, rows) of each task of ``table``: by rows and by bytes (``producers.chunking``)."""
        s, out_row = self.settings, spec.output_bytes if isinstance(spec, ModelSpec) else 0
        rows, size = chunk_rows or s.chunk_rows, chunk_bytes or s.chunk_bytes
        return chunk_bounds(
            table, max_rows=rows, max_bytes=size, max_payload_bytes=s.max_payload_bytes, out_row_bytes=out_row
        )

    def _route(self, spec: ModelSpec) -> str:
        return self.router.queue(spec)

    def _envelope(
        self, spec: ModelSpec, items: list[Item], payload: Placed, deadline: float | None, pack: str | None = None
    ) -> TaskEnvelope:
        """The task of ``items``, whose input ``payload`` (``Transport.place``) carries."""
        return payload.envelope(spec.name, spec.version, items, self._reply_key, deadline, pack)
