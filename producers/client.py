"""The producer client: submit Arrow jobs to the queues and read their results."""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, cast

import numpy as np
import pyarrow as pa
import redis
from celery import Celery

from hetbatch.producers.errors import (
    BrokerError,
    JobExpired,
    JobFailed,
    JobLost,
    JobTimeout,
    PayloadError,
    PayloadTooLarge,
    RemoteError,
    SchemaMismatch,
)
from hetbatch.producers.protocol import shm
from hetbatch.producers.protocol.connect import connect
from hetbatch.producers.protocol.ensemble import EnsembleSpec, plan_stage
from hetbatch.producers.protocol.kombu import LANE_PRIORITY, TRANSPORT_OPTIONS, celery_message, lane_list, priority_list
from hetbatch.producers.protocol.ledger import Attempt, Ledger, task_id_of
from hetbatch.producers.protocol.registry import ModelSpec, Registry, Spec, parse_ref
from hetbatch.producers.protocol.retention import PurgeReport, delete_job, purge_model
from hetbatch.producers.protocol.schema import CastRule, arrays_to_table, to_arrays, to_table, unwrap_tensors
from hetbatch.producers.protocol.wire import (
    CELERY_WIRE_CONFIG,
    DEVICE_KEY,
    TASK_NAME,
    Item,
    Keys,
    Status,
    TaskEnvelope,
    decode_notice,
    decode_pack_result,
    decode_result,
    encode_table,
    pack_header,
    queue_for,
)
from hetbatch.producers.settings import ClientSettings

__all__ = ["Client", "Job", "Pack", "assemble", "make_producer_app", "status_of"]

log = logging.getLogger(__name__)

_PRIORITIES = {"high": 0, "normal": 5, "low": 9}
_FLUSH_BYTES = 1 << 20
_PACK_BYTES = 8 << 20  # most input bytes in one pack of small jobs
_WAKE = b"wake"  # pushed on the reply list by close(): not a notice


def _priority(name: str) -> int:
    level = _PRIORITIES.get(name)
    if level is None:
        raise ValueError(f"priority must be one of {sorted(_PRIORITIES)}, not {name!r}")
    return level


def make_producer_app(url: str) -> Celery:
    """A Celery app that only publishes: JSON messages, no result backend."""
    app = Celery("hetbatch-producer", broker=url, set_as_current=False)
    app.conf.update(
        CELERY_WIRE_CONFIG,
        broker_connection_retry_on_startup=True,
        task_create_missing_queues=True,
        broker_transport_options=dict(TRANSPORT_OPTIONS),
    )
    return app


def assemble(job_id: str, chunks: int, parts: dict[int, bytes]) -> pa.Table:
    """A job's table from its stored chunk results, in order.

    Raises:
        JobFailed: a worker reported an error for a chunk (first failing chunk).
        JobExpired: the deadline passed before it ran.
    """
    tables = []
    for chunk in range(chunks):
        decoded = decode_result(parts[chunk])
        if isinstance(decoded, RemoteError):
            if decoded.type == "JobExpired":
                raise JobExpired(job_id, decoded.message)
            raise JobFailed(job_id if chunks == 1 else f"{job_id} chunk {chunk}", decoded)
        tables.append(decoded)
    table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
    devices = {(t.schema.metadata or {}).get(DEVICE_KEY) for t in tables} - {None}
    if len(devices) > 1:  # concat keeps the first chunk's metadata: say every device that ran it
        meta = {**(table.schema.metadata or {}), DEVICE_KEY: b",".join(sorted(d for d in devices if d))}
        table = table.replace_schema_metadata(meta)
    return unwrap_tensors(table)


def status_of(stored: Sequence[bytes | None], recorded: bool, index: int | None = None) -> Status:
    """A job's status from its chunks' stored results and whether its record exists;
    ``index``: the job's place in its pack (the one stored result is the pack's)."""
    if any(v is None for v in stored):
        return Status.PENDING if recorded else Status.LOST
    for value in stored:
        if index is not None and value is not None and value[:1] == b"P":
            got = pack_header(value)[index]
            if isinstance(got, RemoteError):
                return Status.EXPIRED if got.type == "JobExpired" else Status.FAILED
            continue
        if value is not None and value[:1] == b"E":
            decoded = decode_result(value)
            assert isinstance(decoded, RemoteError)
            return Status.EXPIRED if decoded.type == "JobExpired" else Status.FAILED
    return Status.DONE


class _Waiter:
    """Collects the reply notices of one job."""

    def __init__(self, chunks: int) -> None:
        self.pending = set(range(chunks))
        self.payloads: dict[int, bytes | None] = {}
        self.changed = threading.Event()

    def add(self, chunk: int, payload: bytes | None) -> None:
        if chunk in self.pending:
            self.pending.discard(chunk)
            self.payloads[chunk] = payload
            self.changed.set()


class Pack:
    """The jobs of one ``submit_many`` task share one stored result: read and decoded once."""

    def __init__(self, pack_id: str) -> None:
        self.id = pack_id
        self._results: list[pa.Table | RemoteError] | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._results is not None

    def table(self, job_id: str, index: int, data: bytes | None) -> pa.Table:
        """Job ``index``'s outputs (decoding ``data``, the pack's stored result, on first use).

        Raises:
            JobFailed, JobExpired: as ``Job.result``.
        """
        with self._lock:
            if self._results is None:
                if data is None:
                    raise JobLost(job_id, f"the result of its pack {self.id} is gone")
                self._results = decode_pack_result(data)
            got = self._results[index]
        if isinstance(got, RemoteError):
            if got.type == "JobExpired":
                raise JobExpired(job_id, got.message)
            raise JobFailed(job_id, got)
        return unwrap_tensors(got)


class Job:
    """A submitted job; ``result()`` waits for all its chunks and reassembles them.

    A job of ``submit_many`` is item ``index`` of a ``pack``: its result is stored with
    the pack's other jobs, under the pack's id (its ``unit``).
    """

    def __init__(
        self,
        client: Client,
        job_id: str,
        model: str,
        chunks: int,
        rows: int,
        pack: Pack | None = None,
        index: int = 0,
    ) -> None:
        self.id = job_id
        self.model = model
        self.chunks = chunks
        self.rows = rows
        self.pack = pack
        self.index = index
        self.unit = pack.id if pack is not None else job_id
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
        if self.pack is None:
            return assemble(self.id, self.chunks, self._client._collect(self, timeout_s))
        data = None if self.pack.loaded else self._client._collect(self, timeout_s)[0]
        return self.pack.table(self.id, self.index, data)

    def status(self) -> Status:
        """Where the job stands, read from Redis (no waiting)."""
        return self._client._status(self)

    def done(self) -> bool:
        return self.status() in (Status.DONE, Status.FAILED, Status.EXPIRED, Status.LOST)

    def attempts(self) -> list[Attempt]:
        """Every start of this job's chunks by a worker (worker, time, attempt number), oldest first."""
        return self._client.ledger.attempts(self.unit)

    def delete(self) -> int:
        """Drop the job's record, inputs and results from Redis now; returns keys deleted.

        A job of ``submit_many`` shares them with its pack: this drops the pack's (read
        the other jobs' results first; a result read before stays readable).
        """
        with self._client._lock:
            self._client._waiters.pop(self.unit, None)
        # Inputs in this host's shared-memory folder too (a chunk still queued then fails with JobLost).
        shm.unlink(self._client.settings.shm_dir, [shm.payload_name(self.unit, c) for c in range(self.chunks)])
        return delete_job(self._client.redis, self._client.keys, self.unit, self.chunks)


class Client:
    """Submit jobs to hetbatch workers through Redis and fetch their results.

    A client opens one Redis connection pool and, on first submit, one background
    thread that drains the client's reply list: no per-job subscription.
    """

    def __init__(self, settings: ClientSettings | None = None, *, listen: bool = True) -> None:
        """Open the Redis pool and the publishing app (no connection is made yet).

        Args:
            settings: connection and job shaping (default: from ``HETBATCH_*`` variables).
            listen: drain the reply list in a thread; without it results are read from
                their keys (``AsyncClient`` listens with its own coroutine).
        """
        self._listen_replies = listen
        self.settings = settings or ClientSettings.from_env()
        self.keys = Keys(self.settings.prefix)
        self.redis = connect(self.settings.redis_url)
        self.registry = Registry(self.redis, self.keys)
        self.ledger = Ledger(self.redis, self.keys)
        self.id = uuid.uuid4().hex
        self._reply_key = self.keys.reply(self.id)
        self._celery: Celery | None = None
        self._waiters: dict[str, _Waiter] = {}
        self._lock = threading.Lock()
        self._listener: threading.Thread | None = None
        self._closed = threading.Event()
        self._specs: dict[str, tuple[float, Spec]] = {}
        self._consumed: dict[str, tuple[float, bool]] = {}  # queue or lane -> (checked at, a worker takes it)

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
        self._closed.set()
        if self._listener is not None:
            try:  # wake the listener's BLPOP now rather than at its 1 s timeout
                self.redis.lpush(self._reply_key, _WAKE)
            except redis.RedisError:
                pass
            self._listener.join(timeout=5)
            try:
                self.redis.delete(self._reply_key)
            except redis.RedisError:
                pass
        self.redis.close()
        if self._celery is not None:
            self._celery.close()

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
        level = _priority(priority)
        if isinstance(spec, EnsembleSpec):
            return self._submit_ensemble(spec, data, chunk_rows, cast, level, deadline_s)
        table = self._prepare(spec, data, cast)
        step = chunk_rows or self.settings.chunk_rows
        starts = range(0, table.num_rows, step)
        queue = self._route(spec)
        # A big job goes through shared memory while a worker on this host takes it.
        host = self._host_queue(queue) if table.nbytes >= self.settings.shm_min_bytes else None
        job = Job(self, uuid.uuid4().hex, spec.ref, len(starts), table.num_rows)
        self._track(job.id, job.chunks)
        deadline = time.time() + deadline_s if deadline_s is not None else None
        pipe = self.redis.pipeline(transaction=False)
        outbox: list[TaskEnvelope] = []
        self._record(pipe, job.id, job.model, job.chunks, job.rows)
        lane = job.chunks == 1 and level == LANE_PRIORITY and 0 < job.rows <= self.settings.lane_max_rows
        lane = lane and host is None and self._lane_drained(queue)
        buffered = 0
        try:
            for chunk, start in enumerate(starts):
                part = table.slice(start, step)
                blob = encode_table(part)
                file = shm.payload_name(job.id, chunk) if host is not None else None
                items = [Item(job.id, chunk, part.num_rows)]
                env = self._envelope(spec, items, blob, self.keys.input(job.id, chunk), pipe, deadline, file=file)
                if env.payload_shm is None:  # through Redis after all: the folder is full
                    host = None
                self._enqueue(pipe, host or queue, env, level, outbox, lane=lane)
                buffered += len(blob)
                if buffered >= _FLUSH_BYTES:  # let workers start on early chunks of a big job
                    self._execute(pipe, outbox)
                    buffered = 0
            self._execute(pipe, outbox)
        except Exception:
            self._untrack(job.id)
            shm.unlink(self.settings.shm_dir, [shm.payload_name(job.id, c) for c in range(len(starts))])
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
        one pipelined round trip per ~1 MB.

        Raises:
            ModelNotFound, SchemaMismatch (naming the job's position), BrokerError.
        """
        spec = self.spec(model)
        level = _priority(priority)
        if isinstance(spec, EnsembleSpec):
            # Each ensemble job fans out to its members already; packing would gain nothing.
            return [self.submit(model, d, cast=cast, priority=priority, deadline_s=deadline_s) for d in datas]
        # Big packs: each task costs ~1 ms of worker CPU whatever its size (with 4,096-row
        # packs the model ran at half its in-process rate), and the worker cuts a pack
        # into calls of its own size. Bounded by bytes too, for models with wide inputs.
        limit = pack_rows or self.settings.chunk_rows
        queue = self._route(spec)
        deadline = time.time() + deadline_s if deadline_s is not None else None
        jobs: list[Job] = []
        pack: list[dict[str, np.ndarray]] = []
        sizes: list[int] = []
        pipe = self.redis.pipeline(transaction=False)
        outbox: list[TaskEnvelope] = []
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
            self._record(pipe, pack_id, spec.ref, 1, rows_now, sizes)
            env = self._envelope(spec, items, blob, self.keys.input(pack_id, 0), pipe, deadline, pack=pack_id)
            self._enqueue(pipe, queue, env, level, outbox)
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
                size = sum(a.nbytes for a in arrays.values())
                if rows_now + rows > limit or bytes_now + size > _PACK_BYTES:
                    flush()
                if not sizes:
                    self._track(current.id, 1)
                jobs.append(Job(self, f"{current.id}-{len(sizes)}", spec.ref, 1, rows, current, len(sizes)))
                pack.append(arrays)
                sizes.append(rows)
                rows_now += rows
                bytes_now += size
            flush()
            self._execute(pipe, outbox)
        except Exception:
            for pack_id in {*packs, current.id}:
                self._untrack(pack_id)
            raise
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
        keep_results: bool = False,
        **options: Any,
    ) -> Iterator[tuple[Any, pa.Table]]:
        """Stream ``(batch, outputs)`` pairs in input order, with at most ``max_in_flight``
        jobs submitted and unread: memory stays bounded whatever the input's size. Each
        result is deleted from Redis once read (unless ``keep_results``), so Redis
        holds no more than the window either.

        Raises:
            the errors of ``submit`` and ``Job.result``, at the batch they concern.
        """
        window: deque[tuple[Any, Job]] = deque()

        def take() -> tuple[Any, pa.Table]:
            done, job = window.popleft()
            table = job.result(timeout_s=timeout_s)
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
        """Drop queued tasks of ``model`` (all versions) and the inputs, results and
        records of its jobs still in Redis. Tasks a worker already holds finish.

        Raises:
            ModelNotFound: unknown name.
        """
        name, _ = parse_ref(model)
        spec = self.registry.get(name)
        return purge_model(self.redis, self.keys, name, spec.queue, self.settings.shm_dir)

    def job(self, job_id: str) -> Job:
        """Re-attach to a job submitted earlier (by this or another process).

        Raises:
            JobFailed: no record of that job (unknown id or expired).
        """
        unit, _, index = job_id.rpartition("-") if "-" in job_id else (job_id, "", "")
        raw = cast(bytes | None, self.redis.get(self.keys.job(unit)))
        meta = json.loads(raw) if raw is not None else {}
        sizes = meta.get("pack") or []
        if raw is None or (index and not (index.isdigit() and int(index) < len(sizes))):
            raise JobFailed(job_id, RemoteError("JobLost", "no record of this job: unknown id or expired"))
        if index:
            return Job(self, job_id, str(meta["model"]), 1, int(sizes[int(index)]), Pack(unit), int(index))
        return Job(self, job_id, str(meta["model"]), int(meta["chunks"]), int(meta["rows"]))

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
        blob: bytes | memoryview,
        key: str,
        pipe: Any,
        deadline: float | None,
        pack: str | None = None,
        file: str | None = None,
    ) -> TaskEnvelope:
        """The task of ``blob``: inline, by reference to ``key`` (queued on ``pipe``) or,
        given a ``file`` name, in that shared-memory file (``producers.protocol.shm``) when it can
        be written there."""
        if len(blob) > self.settings.max_payload_bytes:
            raise PayloadTooLarge(len(blob), self.settings.max_payload_bytes)
        common: dict[str, Any] = dict(
            model=spec.name,
            version=spec.version,
            items=tuple(items),
            reply_to=self._reply_key,
            deadline=deadline,
            pack=pack,
        )
        if file is not None:
            try:
                shm.write_payload(self.settings.shm_dir, file, blob)
                return TaskEnvelope(payload_shm=file, **common)
            except OSError as exc:
                log.warning("%s not written (%s); the chunk goes through Redis", file, exc)
                shm.unlink(self.settings.shm_dir, [file])
        if len(blob) <= self.settings.inline_max_bytes:
            return TaskEnvelope(payload_b64=base64.b64encode(blob).decode(), **common)
        pipe.set(key, blob, ex=self.settings.input_ttl_s)
        return TaskEnvelope(payload_key=key, **common)

    def _submit_ensemble(
        self,
        spec: EnsembleSpec,
        data: Any,
        chunk_rows: int | None,
        cast: CastRule,
        level: int,
        deadline_s: float | None,
    ) -> Job:
        """Store each chunk's input once and publish its first stage's member tasks to
        the members' own queues; the workers fuse and write the result under this job's
        id (producers/ensemble.py).

        Raises:
            SchemaMismatch, PayloadTooLarge, BrokerError.
        """
        table = self._prepare(spec, data, cast)
        step = chunk_rows or self.settings.chunk_rows
        starts = range(0, table.num_rows, step)
        job = Job(self, uuid.uuid4().hex, spec.ref, len(starts), table.num_rows)
        self._track(job.id, job.chunks)
        deadline = time.time() + deadline_s if deadline_s is not None else None
        pipe = self.redis.pipeline(transaction=False)
        outbox: list[TaskEnvelope] = []
        self._record(pipe, job.id, job.model, job.chunks, job.rows)
        try:
            for chunk, start in enumerate(starts):
                plan = plan_stage(
                    spec,
                    job_id=job.id,
                    chunk=chunk,
                    stage=0,
                    table=table.slice(start, step),
                    models=self.spec,
                    keys=self.keys,
                    reply_to=self._reply_key,
                    deadline=deadline,
                    priority=level,
                )
                for key, blob in plan.blobs.items():
                    if len(blob) > self.settings.max_payload_bytes:
                        raise PayloadTooLarge(len(blob), self.settings.max_payload_bytes)
                    pipe.set(key, blob, ex=self.settings.input_ttl_s)
                for queue, env in plan.tasks:
                    self._enqueue(pipe, queue, env, level, outbox)
                self._execute(pipe, outbox)  # per chunk: workers start on early chunks of a big job
        except Exception:
            self._untrack(job.id)
            raise
        return job

    def _record(self, pipe: Any, unit: str, model: str, chunks: int, rows: int, pack: list[int] | None = None) -> None:
        """The record of a job (or of a pack: its jobs' rows), written before its tasks are published."""
        meta: dict[str, Any] = {"model": model, "chunks": chunks, "rows": rows, "created": time.time()}
        if pack is not None:
            meta["pack"] = pack
        # execute_command skips redis-py's per-call argument wrappers.
        pipe.execute_command("SET", self.keys.job(unit), json.dumps(meta), "EX", self.settings.result_ttl_s)

    def _enqueue(
        self, pipe: Any, queue: str, env: TaskEnvelope, level: int, outbox: list[TaskEnvelope], lane: bool = False
    ) -> None:
        """Queue the task's ledger record, then its message (or, on the lane, its bare envelope), on ``pipe``."""
        body = env.to_dict()
        # Recorded before it is published, in the same round trip: a lost message can be published again.
        text = self.ledger.record(pipe, env, queue, self.settings.input_ttl_s, body)
        if lane:
            pipe.lpush(lane_list(queue), text)
        else:
            message = celery_message(TASK_NAME, [body], queue, level, env.describe(), task_id_of(env))
            pipe.lpush(priority_list(queue, level), message)
        outbox.append(env)

    def _execute(self, pipe: Any, outbox: list[TaskEnvelope]) -> None:
        """Send the pipeline, retrying connection errors with backoff.

        Raises:
            BrokerError: Redis stayed unreachable for ``publish_retries`` attempts; the
                ledger then forgets the tasks of ``outbox``, so none is published later.
        """
        for attempt in range(self.settings.publish_retries):
            try:
                pipe.execute()
                outbox.clear()
                return
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if attempt + 1 == self.settings.publish_retries:
                    self.ledger.forget(outbox)
                    raise BrokerError(f"Redis at {self._safe_url()} unreachable: {exc}; is it running?") from exc
                time.sleep(0.1 * 2**attempt)

    def _lane_drained(self, queue: str) -> bool:
        """Whether a live worker drains ``queue``'s lane. Without one, a job takes Celery:
        a lane nobody drains (prefork-only or older workers) would keep it waiting."""
        return self._alive(lane_list(queue))

    def _alive(self, queue: str) -> bool:
        """Whether a live worker consumes ``queue`` (its heartbeat keeps a key fresh);
        cached like model specs."""
        now = time.monotonic()
        hit = self._consumed.get(queue)
        if hit is None or now - hit[0] >= self.settings.registry_ttl_s:
            hit = (now, bool(self.redis.exists(self.keys.alive(queue))))
            self._consumed[queue] = hit
        return hit[1]

    def _host_queue(self, queue: str) -> str | None:
        """``queue``'s host queue while a live worker consumes it, that is one that shares
        this client's shared-memory folder (``producers.protocol.shm``); cached like model specs."""
        token = shm.host_token(self.settings.shm_dir)
        if token is None:
            return None
        host = shm.host_queue(queue, token)
        return host if self._alive(host) else None

    def _route(self, spec: ModelSpec) -> str:
        """The model's queue; a gpu model with ``fallback = "cpu"`` goes to the cpu queue while no
        gpu worker of its queue is alive (a job never moves to a cpu silently otherwise)."""
        if spec.device == "gpu" and spec.fallback == "cpu" and not self.redis.exists(self.keys.alive(spec.queue)):
            return queue_for(spec.framework, "cpu")
        return spec.queue

    def _safe_url(self) -> str:
        kw = self.redis.connection_pool.connection_kwargs
        return f"{kw.get('host', '?')}:{kw.get('port', '?')}/{kw.get('db', 0)}"

    def _untrack(self, job_id: str) -> None:
        with self._lock:
            self._waiters.pop(job_id, None)

    def _track(self, unit: str, chunks: int) -> None:
        """Wait for the reply notices of ``unit`` (a job, or a pack of jobs)."""
        if not self._listen_replies:  # results are read from their keys
            return
        with self._lock:
            self._waiters[unit] = _Waiter(chunks)
            if self._listener is None:
                self._listener = threading.Thread(target=self._listen, name="hetbatch-replies", daemon=True)
                self._listener.start()

    def _listen(self) -> None:
        conn = connect(self.settings.redis_url)
        while not self._closed.is_set():
            try:
                first = cast(tuple[bytes, bytes] | None, conn.blpop([self._reply_key], timeout=1))
                if first is None:
                    continue
                # The first notice is handed on before more are fetched: one round trip
                # less between a lone job's result and its caller.
                self._notify([first[1]])
                while more := cast(list[bytes] | None, conn.lpop(self._reply_key, 1024)):
                    self._notify(more)
            except (redis.ConnectionError, redis.TimeoutError):
                time.sleep(0.2)
                continue
        conn.close()

    def _notify(self, batch: list[bytes]) -> None:
        with self._lock:
            for raw in batch:
                if raw == _WAKE:
                    continue
                try:
                    notice = decode_notice(raw)
                except PayloadError:
                    continue  # not ours to answer; the job's stored result is read by _collect
                waiter = self._waiters.get(notice.job_id)
                if waiter is not None:
                    waiter.add(notice.chunk, notice.result)

    def _collect(self, job: Job, timeout_s: float | None) -> dict[int, bytes]:
        """Wait for every chunk of ``job``'s unit (the job, or its pack) and return its stored result bytes."""
        unit, chunks = job.unit, job.chunks
        waiter = self._waiters.get(unit)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        payloads: dict[int, bytes | None] = {}
        # Without a listener the keys are all there is to read: read them often.
        interval = 1.0 if waiter is not None else 0.05
        sweep = 0.0 if waiter is None else time.monotonic() + interval
        while True:
            read: list[int] = []
            if waiter is not None:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                waiter.changed.wait(timeout=1.0 if remaining is None else min(1.0, remaining))
                waiter.changed.clear()
                with self._lock:
                    noticed = dict(waiter.payloads)
                payloads.update({c: v for c, v in noticed.items() if v is not None})
                # Results announced without their bytes are read as they come, while the
                # other chunks still run, not all at the end.
                read = [c for c in noticed if payloads.get(c) is None]
            missing = [c for c in range(chunks) if payloads.get(c) is None]
            swept = time.monotonic() >= sweep
            if swept:
                # Now and then read every missing key: a notice can be missed when a client
                # restarts, but the stored result cannot.
                read, sweep = missing, time.monotonic() + interval
            try:
                if read:
                    stored = cast(list[bytes | None], self.redis.mget([self.keys.result(unit, c) for c in read]))
                    payloads.update({c: v for c, v in zip(read, stored, strict=True) if v is not None})
                if all(payloads.get(c) is not None for c in range(chunks)):
                    with self._lock:
                        self._waiters.pop(unit, None)
                    return {c: v for c, v in payloads.items() if v is not None}
                if swept and missing and not self.redis.exists(self.keys.job(unit)):
                    # The job's record went with Redis (restart without persistence): no worker
                    # will ever answer, so say so instead of waiting.
                    raise JobLost(job.id, "its record vanished from Redis (restarted without persistence?)")
            except (redis.ConnectionError, redis.TimeoutError):
                time.sleep(0.2)  # Redis restarting: keep waiting within timeout_s
            if deadline is not None and time.monotonic() >= deadline:
                done = sum(1 for c in range(chunks) if payloads.get(c) is not None)
                raise JobTimeout(
                    job.id,
                    f"{done}/{chunks} chunks done after {timeout_s} s; are workers running for "
                    f"model {job.model}? ('hetbatch status' shows queues and workers)",
                )
            if waiter is None:
                time.sleep(0.05)

    def _status(self, job: Job) -> Status:
        keys = [self.keys.result(job.unit, c) for c in range(job.chunks)]
        stored = cast(list[bytes | None], self.redis.mget(keys))
        recorded = all(v is not None for v in stored) or bool(self.redis.exists(self.keys.job(job.unit)))
        return status_of(stored, recorded, job.index if job.pack is not None else None)
