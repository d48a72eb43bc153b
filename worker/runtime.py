"""What a worker does with one predict task: decode, validate, batch, store results.

Every failure that concerns a job becomes that job's stored error result; the
worker thread never dies of bad input, and the other items of the task go on.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import pyarrow as pa
import redis

from hetbatch.producers.errors import HetbatchError, JobExpired, JobLost, PayloadError, RemoteError, SchemaMismatch
from hetbatch.producers.protocol import shm
from hetbatch.producers.protocol.connect import connect
from hetbatch.producers.protocol.ledger import Ledger, Start, task_id_of
from hetbatch.producers.protocol.registry import ModelSpec, Registry
from hetbatch.producers.protocol.schema import arrays_to_table, table_to_arrays
from hetbatch.producers.protocol.wire import DEVICE_KEY, Item, Keys, TaskEnvelope, decode_table
from hetbatch.worker.batching import Arrays, Arrivals, Batcher, BatchStats
from hetbatch.worker.metrics import WorkerMetrics
from hetbatch.worker.models import LoadedModel, ModelCache
from hetbatch.worker.ops import status as _status  # noqa: F401  (connects the heartbeat to worker start)
from hetbatch.worker.ops.dlq import DeadLetters
from hetbatch.worker.results import Done, ResultWriter, outcomes_of
from hetbatch.worker.settings import WorkerSettings

__all__ = ["Runtime"]

log = logging.getLogger(__name__)

_STATS_EVERY_S = 0.05


def _error(offset: int, item: Item, exc: BaseException) -> Done:
    return Done(offset, [item], error=RemoteError.from_exception(exc))


def _check_finite(arrays: Mapping[str, np.ndarray], start: int = 0, rows: int | None = None) -> None:
    for name, arr in arrays.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr[start : None if rows is None else start + rows]).all():
            raise SchemaMismatch(
                "NaN or inf values, and this model rejects them",
                column=name,
                expected="finite values",
                received="NaN/inf",
            )


@dataclass
class _Calls:
    """A task's items once ``Runtime._start`` handled them: outcomes known already (items
    rejected before batching) and the model requests still running."""

    outcomes: list[Done]
    pending: list[tuple[list[tuple[int, Item]], Future[Arrays]]] = field(default_factory=list)
    arrays: Mapping[str, np.ndarray] | None = None
    spec: ModelSpec | None = None
    model: LoadedModel | None = None


class Runtime:
    """The per-process state a worker's tasks share: Redis, the models, the batchers."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.keys = Keys(settings.prefix)
        self.redis = connect(settings.redis_url)
        self.registry = Registry(self.redis, self.keys)
        self.arrivals = Arrivals()
        self.models = ModelCache(self.registry, settings, on_batch=self._record_batch, arrivals=self.arrivals)
        self.writer = ResultWriter(
            self.redis, self.keys, ttl_s=settings.result_ttl_s, inline_bytes=settings.notice_inline_bytes
        )
        # Called once every item of a task has a stored result (new or found from an
        # earlier delivery), e.g. to hand an ensemble member's result on to fusion.
        self.after_store: list[Callable[[TaskEnvelope], None]] = []
        self.metrics = WorkerMetrics(settings, self.redis, self.models.loaded).start()
        self.ledger = Ledger(self.redis, self.keys)
        self.dead_letters = DeadLetters(self.redis, self.keys, result_ttl_s=settings.result_ttl_s)
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        # Tasks attempted before run one at a time: if one kills the worker, no other
        # retried task dies with it and is wrongly counted towards the attempt cap.
        self._isolation = threading.Lock()
        self._stats: queue.SimpleQueue[tuple[str, BatchStats] | None] = queue.SimpleQueue()
        self._stats_thread = threading.Thread(target=self._write_stats, name="batch-stats", daemon=True)
        self._stats_thread.start()

    def handle(self, body: Any) -> dict[str, Any]:
        """Run one task body; returns a small summary (what Flower shows as the result)."""
        try:
            env = TaskEnvelope.from_dict(body)
        except PayloadError as exc:
            # No job id to answer to: nothing can be stored, so say it loudly.
            log.error("dropped a task with a malformed envelope: %s", exc)
            return {"error": str(exc)}
        start = self._begin(env, claim=False)
        if start.verdict == "suspect":
            with self._isolation:
                # Load the model before claiming: a worker killed during a slow load did
                # not die of this job, so that must not count towards its attempt cap.
                self._warm(env)
                return self._handle(env, self._begin(env, claim=True))
        return self._handle(env, start)

    def _warm(self, env: TaskEnvelope) -> None:
        try:
            self.models.get(self.models.spec(f"{env.model}@{env.version}"))
        except Exception:  # the same error is met, and stored for the job, in _run
            return

    def _begin(self, env: TaskEnvelope, claim: bool) -> Start:
        return self.ledger.begin(
            env,
            worker=self.worker_id,
            ttl_s=self.settings.result_ttl_s,
            max_attempts=self.settings.max_attempts,
            claim=claim,
        )

    def handle_many(self, bodies: Sequence[Any]) -> dict[str, Any]:
        """Run several task bodies together (a lane batch; ``worker.lane``): one ledger round
        trip, every job's rows in the model's batcher at once, one result round trip.
        Returns a small summary (what Flower shows). What ``handle`` guarantees holds for
        each task."""
        envs = []
        for body in bodies:
            try:
                envs.append(TaskEnvelope.from_dict(body))
            except PayloadError as exc:
                log.error("dropped a task with a malformed envelope: %s", exc)
        if not envs:
            return {"tasks": 0}
        starts = self.ledger.begin_many(
            envs, worker=self.worker_id, ttl_s=self.settings.result_ttl_s, max_attempts=self.settings.max_attempts
        )
        running: list[tuple[TaskEnvelope, _Calls]] = []
        later: list[TaskEnvelope] = []
        # The whole batch is on its way: a batcher must not start a call for the first
        # job while the others are still being decoded.
        refs = [f"{env.model}@{env.version}" for env in envs]
        for ref in refs:
            self.arrivals.enter(ref)
        try:
            for env, start in zip(envs, starts, strict=True):
                todo = self._pending_items(env, start.done)
                if start.verdict == "run" and todo:
                    running.append((env, self._start(env, todo)))
                elif start.verdict == "suspect":
                    later.append(env)
                else:  # a duplicate or a dead letter: no model call
                    self._handle(env, start)
        finally:
            for ref in refs:
                self.arrivals.leave(ref)
        finished = [(env, self._collect(calls)) for env, calls in running]
        self._store(finished)
        for env in later:  # attempted before: alone, after the innocent batch is stored
            with self._isolation:
                self._warm(env)
                self._handle(env, self._begin(env, claim=True))
        failed = sum(len(d.items) for _, done in finished for d in done if d.error is not None)
        models = sorted({f"{env.model}@{env.version}" for env in envs})
        return {"models": models, "tasks": len(envs), "failed": failed, "rows": sum(env.rows for env in envs)}

    def _handle(self, env: TaskEnvelope, start: Start) -> dict[str, Any]:
        todo = self._pending_items(env, start.done)
        if not todo:
            self._after_store(env)
            return {"model": env.model, "duplicate": len(env.items)}
        if start.verdict == "dead":
            reason = f"started {start.attempts} times without finishing (max_attempts={self.settings.max_attempts})"
            log.error("dead-lettering %s: %s", env.describe(), reason)
            self.dead_letters.bury(env, start.attempts, reason)
            return {"model": env.model, "dead_lettered": len(todo)}
        done = self._run(env, todo)
        self._store([(env, done)])
        failed = sum(len(d.items) for d in done if d.error is not None)
        return {"model": f"{env.model}@{env.version}", "items": len(todo), "failed": failed, "rows": env.rows}

    def _store(self, finished: Sequence[tuple[TaskEnvelope, list[Done]]]) -> None:
        """Write the outcomes of finished tasks (one round trip), then hand each on."""
        if not finished:
            return
        writes = [
            (outcomes_of(env, done, self.settings.max_result_bytes), env.reply_to, task_id_of(env))
            for env, done in finished
        ]
        stored = self.writer.write_many(writes)
        duplicates = sum(len(outcomes) - n for (outcomes, _, _), n in zip(writes, stored, strict=True))
        if duplicates:  # another execution of the same items finished first
            self.ledger.count("duplicate_results", duplicates)
        for env, done in finished:
            self._after_store(env)
            self.metrics.observe_done(f"{env.model}@{env.version}", done)
        # An ensemble's input is shared: fusion drops it.
        inputs = [env.payload_key for env, _ in finished if env.payload_key is not None and env.then is None]
        if inputs:
            self.redis.delete(*inputs)
        files = [env.payload_shm for env, _ in finished if env.payload_shm is not None and env.then is None]
        shm.unlink(self.settings.shm_dir, files)

    def _after_store(self, env: TaskEnvelope) -> None:
        for hook in self.after_store:
            hook(env)

    @staticmethod
    def _pending_items(env: TaskEnvelope, done: tuple[bool, ...]) -> list[tuple[int, Item]]:
        """(row offset, item) of the items that have no stored result yet."""
        if env.pack is not None:  # stored as one unit: all items or none
            done = done * len(env.items)
        out, offset = [], 0
        for item, stored in zip(env.items, done, strict=True):
            if not stored:
                out.append((offset, item))
            offset += item.rows
        return out

    def _run(self, env: TaskEnvelope, todo: list[tuple[int, Item]]) -> list[Done]:
        return self._collect(self._start(env, todo))

    def _start(self, env: TaskEnvelope, todo: list[tuple[int, Item]]) -> _Calls:
        """Validate the items and hand their rows to the model's batcher (no waiting)."""
        if env.deadline is not None and time.time() > env.deadline:
            why = f"deadline passed {time.time() - env.deadline:.1f} s before it ran; the model was not called"
            return _Calls([_error(o, i, JobExpired(i.job_id, why)) for o, i in todo])
        ref = f"{env.model}@{env.version}"
        self.arrivals.enter(ref)
        try:
            try:
                spec = self.models.spec(ref)
                arrays = table_to_arrays(self._table(env), spec.inputs)
                model = self.models.get(spec)
            except Exception as exc:  # everything here is about the whole task's input
                if not isinstance(exc, HetbatchError):
                    log.warning("task for %s failed before batching: %s", env.describe(), exc)
                return _Calls([_error(o, i, exc) for o, i in todo])
            outcomes: list[Done] = []
            runs: list[list[tuple[int, Item]]] = []  # contiguous valid items share one model request
            check_items = False
            if spec.nan == "reject":  # one pass over the payload; per item only when it finds some
                try:
                    _check_finite(arrays)
                except SchemaMismatch:
                    check_items = True
            for offset, item in todo:
                try:
                    if check_items:
                        _check_finite(arrays, offset, item.rows)
                    if item.rows == 0:
                        raise SchemaMismatch("the job has no rows; nothing to predict")
                except HetbatchError as exc:  # rejected before merging: the others go on
                    outcomes.append(_error(offset, item, exc))
                    continue
                last = runs[-1][-1] if runs else None
                if last is not None and last[0] + last[1].rows == offset and model.batcher.merges:
                    runs[-1].append((offset, item))
                else:
                    runs.append([(offset, item)])
        finally:
            self.arrivals.leave(ref)
        pending = [(run, self._submit(model.batcher, arrays, run)) for run in runs]
        return _Calls(outcomes, pending, arrays, spec, model)

    def _collect(self, calls: _Calls) -> list[Done]:
        """Wait for the model requests ``_start`` made; every item's outcome."""
        outcomes = calls.outcomes
        for run, future in calls.pending:
            assert calls.arrays is not None and calls.spec is not None and calls.model is not None
            outcomes += self._finish(run, future, calls.arrays, calls.spec, calls.model)
        return outcomes

    @staticmethod
    def _submit(batcher: Batcher, arrays: Mapping[str, np.ndarray], run: list[tuple[int, Item]]) -> Future[Arrays]:
        start, rows = run[0][0], sum(item.rows for _, item in run)
        return batcher.submit({n: a[start : start + rows] for n, a in arrays.items()}, rows)

    def _finish(
        self,
        run: list[tuple[int, Item]],
        future: Future[Arrays],
        arrays: Mapping[str, np.ndarray],
        spec: ModelSpec,
        model: LoadedModel,
    ) -> list[Done]:
        """Outcomes of one run of items; a failed run of several is retried item by item,
        so the batcher's bisection finds the one job that makes the model raise."""
        try:
            outputs = future.result(timeout=self.settings.task_timeout_s)
        except FutureTimeout:
            late = TimeoutError(f"no model result within {self.settings.task_timeout_s} s")
            return [_error(o, i, late) for o, i in run]
        except Exception as exc:
            if len(run) == 1:
                return [_error(run[0][0], run[0][1], exc)]
            singles = [([one], self._submit(model.batcher, arrays, [one])) for one in run]
            return [o for single, fut in singles for o in self._finish(single, fut, arrays, spec, model)]
        table = self._select(outputs, spec)
        # Which device ran it: a gpu model with fallback = "cpu" may have run on a cpu worker.
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), DEVICE_KEY: model.adapter.device.encode()}
        )
        return [Done(run[0][0], [item for _, item in run], table=table)]

    @staticmethod
    def _select(outputs: Mapping[str, np.ndarray], spec: ModelSpec) -> pa.Table:
        names = [n for n in spec.outputs if n in outputs] or list(outputs)
        return arrays_to_table({n: outputs[n] for n in names})

    def _table(self, env: TaskEnvelope) -> pa.Table:
        if env.payload_key is not None:
            data = cast(bytes | None, self.redis.get(env.payload_key))
            if data is None:
                raise JobLost(env.items[0].job_id, f"input {env.payload_key} is gone (TTL passed or Redis lost it)")
        elif env.payload_shm is not None:
            job, limit = env.items[0].job_id, self.settings.max_payload_bytes
            data = shm.read_payload(self.settings.shm_dir, env.payload_shm, job, limit)
        else:
            data = env.inline_payload()
        table = decode_table(data, max_bytes=self.settings.max_payload_bytes, max_rows=env.rows)
        if table.num_rows != env.rows:
            raise PayloadError(f"payload has {table.num_rows} rows, the envelope says {env.rows}")
        return table

    def _record_batch(self, spec: ModelSpec, stats: BatchStats) -> None:
        self.metrics.observe_batch(spec.ref, stats)
        self._stats.put((spec.ref, stats))

    def _write_stats(self) -> None:
        """Batch stats go to Redis from this thread, summed per model, at most every
        ``_STATS_EVERY_S``: a model call never waits on that write, and many small
        batches cost one pipeline."""
        stopping = False
        while not stopping:
            entries = [self._stats.get()]
            while not self._stats.empty():
                entries.append(self._stats.get())
            totals: dict[str, list[float]] = {}
            for entry in entries:
                if entry is None:
                    stopping = True
                    continue
                ref, stats = entry
                t = totals.setdefault(ref, [0, 0, 0, 0.0, 0.0, 0.0])
                values = (1, stats.rows, stats.requests, stats.compute_s, stats.queue_wait_s, stats.busy_s)
                for i, value in enumerate(values):
                    t[i] += value
            pipe = self.redis.pipeline(transaction=False)
            for ref, (batches, rows, requests, compute_s, wait_s, busy_s) in totals.items():
                key = f"{self.keys.prefix}:stats:{ref}"
                pipe.hincrby(key, "batches", int(batches))
                pipe.hincrby(key, "rows", int(rows))
                pipe.hincrby(key, "requests", int(requests))
                pipe.hincrbyfloat(key, "compute_s", compute_s)
                pipe.hincrbyfloat(key, "queue_wait_s", wait_s)
                pipe.hincrbyfloat(key, "busy_s", busy_s)
            try:
                if totals:
                    pipe.execute()
            except redis.RedisError as exc:
                # A Redis restart must cost a statistic, not the writer.
                log.info("batch stats not recorded: %s", exc)
            if not stopping:
                time.sleep(_STATS_EVERY_S)

    def close(self) -> None:
        self.metrics.stop()
        self.models.close()
        self._stats.put(None)
        self._stats_thread.join(timeout=5)
        self.redis.close()
