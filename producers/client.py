"""The producer client: submit Arrow jobs to the queues and read their results."""

from __future__ import annotations

import base64
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, cast

import pyarrow as pa
import redis
from celery import Celery

from producers.errors import (
    BrokerError,
    JobExpired,
    JobFailed,
    JobLost,
    JobTimeout,
    PayloadTooLarge,
    RemoteError,
    SchemaMismatch,
)
from producers.ledger import Attempt, Ledger, task_id_of
from producers.registry import ModelSpec, Registry, Spec
from producers.schema import CastRule, to_table, unwrap_tensors
from producers.settings import ClientSettings
from producers.wire import (
    CELERY_WIRE_CONFIG,
    TASK_NAME,
    Item,
    Keys,
    Status,
    TaskEnvelope,
    decode_notice,
    decode_result,
    encode_table,
)

__all__ = ["Client", "Job", "make_producer_app"]

_PRIORITIES = {"high": 0, "normal": 5, "low": 9}


def make_producer_app(url: str) -> Celery:
    """A Celery app that only publishes: JSON messages, no result backend."""
    app = Celery("hetbatch-producer", broker=url, set_as_current=False)
    app.conf.update(
        CELERY_WIRE_CONFIG,
        broker_connection_retry_on_startup=True,
        task_create_missing_queues=True,
        broker_transport_options={"priority_steps": list(range(10)), "sep": ":", "queue_order_strategy": "priority"},
    )
    return app


class _Waiter:
    """Collects the reply notices of one job."""

    def __init__(self, chunks: int) -> None:
        self.pending = set(range(chunks))
        self.payloads: dict[int, bytes | None] = {}
        self.done = threading.Event()

    def add(self, chunk: int, payload: bytes | None) -> None:
        if chunk in self.pending:
            self.pending.discard(chunk)
            self.payloads[chunk] = payload
            if not self.pending:
                self.done.set()


class Job:
    """A submitted job; ``result()`` waits for all its chunks and reassembles them."""

    def __init__(self, client: Client, job_id: str, model: str, chunks: int, rows: int) -> None:
        self.id = job_id
        self.model = model
        self.chunks = chunks
        self.rows = rows
        self._client = client

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, model={self.model!r}, chunks={self.chunks}, rows={self.rows})"

    def result(self, timeout_s: float | None = 300.0) -> pa.Table:
        """Wait for the job and return its outputs, one column per model output, rows in order.

        Raises:
            JobFailed: a worker reported an error for a chunk (first failing chunk).
            JobExpired: the deadline passed before it ran.
            JobTimeout: not finished within ``timeout_s``.
        """
        parts = self._client._collect(self, timeout_s)
        tables = []
        for chunk in range(self.chunks):
            decoded = decode_result(parts[chunk])
            if isinstance(decoded, RemoteError):
                if decoded.type == "JobExpired":
                    raise JobExpired(self.id, decoded.message)
                raise JobFailed(self.id if self.chunks == 1 else f"{self.id} chunk {chunk}", decoded)
            tables.append(decoded)
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
        return unwrap_tensors(table)

    def status(self) -> Status:
        """Where the job stands, read from Redis (no waiting)."""
        return self._client._status(self)

    def done(self) -> bool:
        return self.status() in (Status.DONE, Status.FAILED, Status.EXPIRED, Status.LOST)

    def attempts(self) -> list[Attempt]:
        """Every start of this job's chunks by a worker (worker, time, attempt number), oldest first."""
        return self._client.ledger.attempts(self.id)


class Client:
    """Submit jobs to hetbatch workers through Redis and fetch their results.

    A client opens one Redis connection pool and, on first submit, one background
    thread that drains the client's reply list: no per-job subscription.
    """

    def __init__(self, settings: ClientSettings | None = None) -> None:
        self.settings = settings or ClientSettings.from_env()
        self.keys = Keys(self.settings.prefix)
        self.redis = redis.Redis.from_url(self.settings.redis_url)
        self.registry = Registry(self.redis, self.keys)
        self.ledger = Ledger(self.redis, self.keys)
        self.id = uuid.uuid4().hex
        self._reply_key = self.keys.reply(self.id)
        self._app = make_producer_app(self.settings.redis_url)
        self._waiters: dict[str, _Waiter] = {}
        self._lock = threading.Lock()
        self._listener: threading.Thread | None = None
        self._closed = threading.Event()
        self._specs: dict[str, tuple[float, Spec]] = {}

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
        self._closed.set()
        if self._listener is not None:
            self._listener.join(timeout=5)
        self.redis.close()
        self._app.close()

    # -- registry ------------------------------------------------------------

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
            raise BrokerError(f"Redis at {self._safe_url()} unreachable: {exc}; is it running?") from exc
        self._specs[model] = (now, spec)
        return spec

    # -- submitting ----------------------------------------------------------

    def submit(
        self,
        model: str,
        data: Any,
        *,
        chunk_rows: int | None = None,
        cast: CastRule = "safe",
        priority: str = "normal",
        deadline_s: float | None = None,
    ) -> Job:
        """Validate ``data`` against the model's inputs and enqueue it in chunks.

        Args:
            model: ``name`` (latest version) or ``name@version``.
            data: pyarrow Table/RecordBatch, pandas DataFrame, dict of numpy arrays,
                or a 2-D numpy array for single-input models.
            chunk_rows: rows per task (default ``settings.chunk_rows``).
            cast: how far dtypes may be converted: ``safe`` (lossless) by default.
            priority: ``high``, ``normal`` or ``low``.
            deadline_s: seconds from now after which the job must not run.

        Raises:
            ModelNotFound, SchemaMismatch, PayloadTooLarge, BrokerError.
        """
        spec = self.spec(model)
        table = self._prepare(spec, data, cast)
        step = chunk_rows or self.settings.chunk_rows
        parts = [table.slice(start, step) for start in range(0, table.num_rows, step)]
        job_id = uuid.uuid4().hex
        deadline = time.time() + deadline_s if deadline_s is not None else None
        envelopes = []
        pipe = self.redis.pipeline(transaction=False)
        for chunk, part in enumerate(parts):
            item = Item(job_id, chunk, part.num_rows)
            envelopes.append(
                self._envelope(spec, [item], encode_table(part), self.keys.input(job_id, chunk), pipe, deadline)
            )
        self._record_job(pipe, job_id, spec, len(parts), table.num_rows)
        self._execute(pipe)
        job = self._track(job_id, spec.ref, len(parts), table.num_rows)
        self._publish(spec, envelopes, priority)
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
        messages (the per-message cost dominates small jobs).

        Raises:
            ModelNotFound, SchemaMismatch (naming the job's position), BrokerError.
        """
        spec = self.spec(model)
        limit = pack_rows or spec.max_batch_rows or 4096
        deadline = time.time() + deadline_s if deadline_s is not None else None
        jobs: list[Job] = []
        envelopes: list[TaskEnvelope] = []
        pack_tables: list[pa.Table] = []
        pack_items: list[Item] = []
        pack_size = 0
        pipe = self.redis.pipeline(transaction=False)

        def flush() -> None:
            nonlocal pack_size
            if not pack_items:
                return
            pack_id = uuid.uuid4().hex
            blob = encode_table(pa.concat_tables(pack_tables) if len(pack_tables) > 1 else pack_tables[0])
            envelopes.append(self._envelope(spec, pack_items.copy(), blob, self.keys.pack(pack_id), pipe, deadline))
            pack_tables.clear()
            pack_items.clear()
            pack_size = 0

        for position, data in enumerate(datas):
            try:
                table = self._prepare(spec, data, cast)
            except SchemaMismatch as exc:
                raise SchemaMismatch(f"job #{position} of submit_many: {exc}") from exc
            job_id = uuid.uuid4().hex
            if pack_size + table.num_rows > limit:
                flush()
            pack_tables.append(table)
            pack_items.append(Item(job_id, 0, table.num_rows))
            pack_size += table.num_rows
            self._record_job(pipe, job_id, spec, 1, table.num_rows)
            jobs.append(self._track(job_id, spec.ref, 1, table.num_rows))
        flush()
        self._execute(pipe)
        self._publish(spec, envelopes, priority)
        return jobs

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
        **options: Any,
    ) -> Iterator[tuple[Any, pa.Table]]:
        """Stream ``(batch, outputs)`` pairs in input order, with at most ``max_in_flight``
        jobs submitted and unread: memory stays bounded whatever the input's size.

        Raises:
            the errors of ``submit`` and ``Job.result``, at the batch they concern.
        """
        window: deque[tuple[Any, Job]] = deque()
        for batch in batches:
            if len(window) >= max_in_flight:
                done, job = window.popleft()
                yield done, job.result(timeout_s=timeout_s)
            window.append((batch, self.submit(model, batch, **options)))
        while window:
            done, job = window.popleft()
            yield done, job.result(timeout_s=timeout_s)

    def job(self, job_id: str) -> Job:
        """Re-attach to a job submitted earlier (by this or another process).

        Raises:
            JobFailed: no record of that job (unknown id or expired).
        """
        meta = cast(dict[bytes, bytes], self.redis.hgetall(self.keys.job(job_id)))
        if not meta:
            raise JobFailed(job_id, RemoteError("JobLost", "no record of this job: unknown id or expired"))
        return Job(self, job_id, meta[b"model"].decode(), int(meta[b"chunks"]), int(meta[b"rows"]))

    # -- internals -----------------------------------------------------------

    def _prepare(self, spec: Spec, data: Any, cast: CastRule) -> pa.Table:
        table = to_table(data, spec.inputs, cast=cast)
        if table.num_rows == 0:
            raise SchemaMismatch("the input has no rows; nothing to predict")
        return table

    def _envelope(
        self,
        spec: ModelSpec,
        items: Sequence[Item],
        blob: bytes,
        key: str,
        pipe: Any,
        deadline: float | None,
    ) -> TaskEnvelope:
        if len(blob) > self.settings.max_payload_bytes:
            raise PayloadTooLarge(len(blob), self.settings.max_payload_bytes)
        common: dict[str, Any] = dict(
            model=spec.name, version=spec.version, items=tuple(items), reply_to=self._reply_key, deadline=deadline
        )
        if len(blob) <= self.settings.inline_max_bytes:
            env = TaskEnvelope(payload_b64=base64.b64encode(blob).decode(), **common)
        else:
            pipe.set(key, blob, ex=self.settings.input_ttl_s)
            env = TaskEnvelope(payload_key=key, **common)
        # In the same pipeline, before publishing: a lost message can be published again.
        self.ledger.record(pipe, env, spec.queue, self.settings.input_ttl_s)
        return env

    def _record_job(self, pipe: Any, job_id: str, spec: ModelSpec, chunks: int, rows: int) -> None:
        key = self.keys.job(job_id)
        pipe.hset(key, mapping={"model": spec.ref, "chunks": chunks, "rows": rows, "created": time.time()})
        pipe.expire(key, self.settings.result_ttl_s)

    def _execute(self, pipe: Any) -> None:
        for attempt in range(self.settings.publish_retries):
            try:
                pipe.execute()
                return
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if attempt + 1 == self.settings.publish_retries:
                    raise BrokerError(f"Redis at {self._safe_url()} unreachable: {exc}; is it running?") from exc
                time.sleep(0.1 * 2**attempt)

    def _publish(self, spec: ModelSpec, envelopes: Sequence[TaskEnvelope], priority: str) -> None:
        level = _PRIORITIES.get(priority)
        if level is None:
            raise ValueError(f"priority must be one of {sorted(_PRIORITIES)}, not {priority!r}")
        try:
            with self._app.producer_or_acquire() as producer:
                for env in envelopes:
                    self._app.send_task(
                        TASK_NAME,
                        args=[env.to_dict()],
                        queue=spec.queue,
                        priority=level,
                        producer=producer,
                        task_id=task_id_of(env),
                        argsrepr=env.describe(),
                        retry=True,
                        retry_policy={"max_retries": self.settings.publish_retries},
                    )
        except Exception as exc:  # kombu raises many kinds; all mean the same here
            self.ledger.forget(envelopes)  # not accepted: the reconciler must not publish them later
            raise BrokerError(f"could not publish to queue {spec.queue!r} at {self._safe_url()}: {exc}") from exc

    def _safe_url(self) -> str:
        kw = self.redis.connection_pool.connection_kwargs
        return f"{kw.get('host', '?')}:{kw.get('port', '?')}/{kw.get('db', 0)}"

    def _track(self, job_id: str, ref: str, chunks: int, rows: int) -> Job:
        with self._lock:
            self._waiters[job_id] = _Waiter(chunks)
            if self._listener is None:
                self._listener = threading.Thread(target=self._listen, name="hetbatch-replies", daemon=True)
                self._listener.start()
        return Job(self, job_id, ref, chunks, rows)

    def _listen(self) -> None:
        conn = redis.Redis.from_url(self.settings.redis_url)
        while not self._closed.is_set():
            try:
                first = cast(tuple[bytes, bytes] | None, conn.blpop([self._reply_key], timeout=1))
                if first is None:
                    continue
                more = cast(list[bytes] | None, conn.lpop(self._reply_key, 1024))
                batch = [first[1], *(more or [])]
            except (redis.ConnectionError, redis.TimeoutError):
                time.sleep(0.2)
                continue
            with self._lock:
                for raw in batch:
                    notice = decode_notice(raw)
                    waiter = self._waiters.get(notice.job_id)
                    if waiter is not None:
                        waiter.add(notice.chunk, notice.result)
        conn.close()

    def _collect(self, job: Job, timeout_s: float | None) -> dict[int, bytes]:
        """Wait for every chunk of ``job`` and return its stored result bytes."""
        waiter = self._waiters.get(job.id)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        payloads: dict[int, bytes | None] = {}
        while True:
            if waiter is not None:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                # Wake now and then to read the keys too: a notice can be missed when a
                # client restarts, but the stored result cannot.
                waiter.done.wait(timeout=1.0 if remaining is None else min(1.0, remaining))
                with self._lock:
                    payloads = dict(waiter.payloads)
            missing = [c for c in range(job.chunks) if payloads.get(c) is None]
            try:
                if missing:
                    stored = cast(list[bytes | None], self.redis.mget([self.keys.result(job.id, c) for c in missing]))
                    payloads.update({c: v for c, v in zip(missing, stored, strict=True) if v is not None})
                if all(payloads.get(c) is not None for c in range(job.chunks)):
                    with self._lock:
                        self._waiters.pop(job.id, None)
                    return {c: v for c, v in payloads.items() if v is not None}
                if missing and not self.redis.exists(self.keys.job(job.id)):
                    # The job's record went with Redis (restart without persistence): no worker
                    # will ever answer, so say so instead of waiting.
                    raise JobLost(job.id, "its record vanished from Redis (restarted without persistence?)")
            except (redis.ConnectionError, redis.TimeoutError):
                time.sleep(0.2)  # Redis restarting: keep waiting within timeout_s
            if deadline is not None and time.monotonic() >= deadline:
                done = sum(1 for c in range(job.chunks) if payloads.get(c) is not None)
                raise JobTimeout(
                    job.id,
                    f"{done}/{job.chunks} chunks done after {timeout_s} s; are workers running for "
                    f"model {job.model}? ('hetbatch status' shows queues and workers)",
                )
            if waiter is None:
                time.sleep(0.05)

    def _status(self, job: Job) -> Status:
        stored = cast(list[bytes | None], self.redis.mget([self.keys.result(job.id, c) for c in range(job.chunks)]))
        if any(v is None for v in stored):
            exists = self.redis.exists(self.keys.job(job.id))
            return Status.PENDING if exists else Status.LOST
        for value in stored:
            assert value is not None
            if value[:1] == b"E":
                decoded = decode_result(value)
                assert isinstance(decoded, RemoteError)
                return Status.EXPIRED if decoded.type == "JobExpired" else Status.FAILED
        return Status.DONE
