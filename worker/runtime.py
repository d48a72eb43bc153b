"""What a worker does with one predict task: decode, validate, batch, store results.

Every failure that concerns a job becomes that job's stored error result; the
worker thread never dies of bad input, and the other items of the task go on.
Everything else (metrics, batch statistics, dropping inputs, the ensemble hand-on)
is a ``worker.hooks.Hook`` that ``worker.process`` registers.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import redis

from hetbatch.adapters.errors import PredictError
from hetbatch.producers.errors import HetbatchError, JobExpired, JobTimeout, PayloadError, RemoteError, SchemaMismatch
from hetbatch.producers.protocol import tracing
from hetbatch.producers.protocol.connect import connect
from hetbatch.producers.protocol.keys import Keys
from hetbatch.producers.protocol.ledger import Ledger, Start, Verdict, task_id_of
from hetbatch.producers.protocol.registry import ModelSpec, Registry
from hetbatch.producers.protocol.schema import arrays_to_table, table_to_arrays
from hetbatch.producers.protocol.transport import Transport
from hetbatch.producers.protocol.wire import DEVICE_KEY, Item, TaskEnvelope, answerable, decode_table
from hetbatch.worker.batching import Arrivals, Batcher, BatchStats, Pieces, join
from hetbatch.worker.budget import ByteBudget, task_bytes
from hetbatch.worker.hooks import Hook
from hetbatch.worker.models import LoadedModel, ModelCache
from hetbatch.worker.ops.dlq import DeadLetters
from hetbatch.worker.results import Done, ResultWriter, library_error, outcomes_of
from hetbatch.worker.settings import WorkerSettings

__all__ = ["Runtime"]

log = logging.getLogger(__name__)


PIECE_BYTES = 1 << 20
"""Outputs of model calls this big on average stay apart, a record batch each (no copy);
smaller ones are joined: a table and a batch header per call would cost more than a copy."""


def _error(offset: int, item: Item, exc: BaseException, fallback: type[Exception] = PayloadError) -> Done:
    return Done(offset, [item], error=RemoteError.from_exception(library_error(exc, fallback)))


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
    pending: list[tuple[list[tuple[int, Item]], Future[Pieces]]] = field(default_factory=list)
    arrays: Mapping[str, np.ndarray] | None = None
    spec: ModelSpec | None = None
    model: LoadedModel | None = None
    trace: str | None = None  # the task's traceparent, for the model call's links


class Runtime:
    """The per-process state a worker's tasks share: Redis, the models, the batchers.

    Args:
        settings: the worker's settings.
        hooks: called after each store and each model call, in order (``add_hook`` adds more).
    """

    def __init__(self, settings: WorkerSettings, hooks: Sequence[Hook] = ()) -> None:
        self.settings = settings
        if settings.tracing:  # process-wide (``producers.protocol.tracing``)
            tracing.configure(True)
        self.keys = Keys(settings.prefix)
        self.redis = connect(settings.redis_url)
        self.transport = Transport(self.keys, settings.shm_dir, settings.max_payload_bytes)
        self.registry = Registry(self.redis, self.keys)
        self.arrivals = Arrivals()
        # Bounds memory by the bytes of the tasks in flight, not by thread count x chunk size.
        self.budget = ByteBudget(settings.max_inflight_bytes)
        self.models = ModelCache(self.registry, settings, on_batch=self._record_batch, arrivals=self.arrivals)
        self.writer = ResultWriter(
            self.redis,
            self.keys,
            ttl_s=settings.result_ttl_s,
            inline_bytes=settings.notice_inline_bytes,
            transport=self.transport,
        )
        self.hooks: list[Hook] = list(hooks)
        self.ledger = Ledger(self.redis, self.keys)
        self.dead_letters = DeadLetters(self.redis, self.keys, result_ttl_s=settings.result_ttl_s)
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        # Tasks attempted before run one at a time: if one kills the worker, no other
        # retried task dies with it and is wrongly counted towards the attempt cap.
        self._isolation = threading.Lock()

    def add_hook(self, hook: Hook) -> None:
        """Call ``hook`` after every later store and model call (after the hooks added before)."""
        self.hooks.append(hook)

    def handle(self, body: Any) -> dict[str, Any]:
        """Run one task body; returns a small summary (what Flower shows as the result)."""
        try:
            env = TaskEnvelope.from_dict(body)
        except Exception as exc:  # PayloadError, or anything else a hostile body finds
            # No job id to answer to: dead-letter the body, and say so loudly.
            reason = str(exc) if isinstance(exc, PayloadError) else f"{type(exc).__name__}: {exc}"
            answer = answerable(body)
            if answer is not None:  # it names jobs: the refusal is their result (their producer must not hang)
                error = RemoteError.from_exception(exc if isinstance(exc, PayloadError) else PayloadError(reason))
                refusal = outcomes_of(answer, [Done(0, list(answer.items), error=error)], 1 << 62)
                self.writer.write(refusal, answer.reply_to)
                log.warning("refused a task envelope: %s", reason[:300])
                return {"error": reason, "answered": len(answer.items)}
            try:
                raw = json.dumps(body, default=repr).encode()
            except (ValueError, RecursionError):  # nested past the encoder's depth
                raw = repr(type(body)).encode()
            task_id = self.dead_letters.bury_raw(raw, f"not a task envelope: {reason}", queue="")
            log.error("dead-lettered a task body that is not an envelope as %s: %s", task_id, reason[:200])
            return {"error": reason, "dead_lettered": task_id}
        start = self._begin(env, claim=False)
        if start.verdict is Verdict.SUSPECT:
            with self._isolation:
                # Load the model before claiming: a worker killed during a slow load did
                # not die of this job, so that must not count towards its attempt cap.
                self._warm(env)
                return self._handle(env, self._begin(env, claim=True))
        return self._handle(env, start)

    def _warm(self, env: TaskEnvelope) -> None:
        try:
            self.models.get(self.models.spec(env.ref))
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

    def handle_many(self, envs: Sequence[TaskEnvelope]) -> dict[str, Any]:
        """Run several tasks together (a lane batch; ``worker.lane`` decodes them): one ledger
        round trip, every job's rows in the model's batcher at once, one result round trip.
        Returns a small summary (what Flower shows). What ``handle`` guarantees holds for
        each task."""
        if not envs:
            return {"tasks": 0}
        starts = self.ledger.begin_many(
            envs, worker=self.worker_id, ttl_s=self.settings.result_ttl_s, max_attempts=self.settings.max_attempts
        )
        with (
            self.budget.hold(sum(self._task_bytes(env) for env in envs)),
            tracing.batch_span("hetbatch.batch", (env.trace for env in envs), {"hetbatch.tasks": len(envs)}),
        ):
            later, failed = self._run_many(envs, starts)
        for env in later:  # attempted before: alone, after the innocent batch is stored
            with self._isolation:
                self._warm(env)
                self._handle(env, self._begin(env, claim=True))
        models = sorted({env.ref for env in envs})
        return {"models": models, "tasks": len(envs), "failed": failed, "rows": sum(env.rows for env in envs)}

    def _run_many(self, envs: Sequence[TaskEnvelope], starts: Sequence[Start]) -> tuple[list[TaskEnvelope], int]:
        """``handle_many``'s tasks that may run now, run and stored; returns the suspects
        (to run alone next) and how many items failed."""
        running: list[tuple[TaskEnvelope, _Calls]] = []
        later: list[TaskEnvelope] = []
        # The whole batch is on its way: a batcher must not start a call for the first
        # job while the others are still being decoded.
        refs = [env.ref for env in envs]
        for ref in refs:
            self.arrivals.enter(ref)
        try:
            for env, start in zip(envs, starts, strict=True):
                todo = self._pending_items(env, start.done)
                if start.verdict is Verdict.RUN and todo:
                    running.append((env, self._start(env, todo)))
                elif start.verdict is Verdict.SUSPECT:
                    later.append(env)
                else:  # a duplicate or a dead letter: no model call
                    self._handle(env, start)
        finally:
            for ref in refs:
                self.arrivals.leave(ref)
        finished = [(env, self._collect(calls)) for env, calls in running]
        self._store(finished)
        return later, sum(len(d.items) for _, done in finished for d in done if d.error is not None)

    def _task_bytes(self, env: TaskEnvelope) -> int:
        """What ``env`` holds while it runs (``worker.budget``); 0 for a model not found (its error)."""
        try:
            return task_bytes(self.models.spec(env.ref), env.rows)
        except Exception:  # met again, and stored as the job's error, in _start
            return 0

    def _handle(self, env: TaskEnvelope, start: Start) -> dict[str, Any]:
        if start.verdict is Verdict.GONE:
            # Deleted or purged: never run, never answered; only an input the deletion could
            # not reach (a shared-memory file of this host, deleted from another) goes too.
            keys, files = self.transport.consumed([env])
            self.transport.drop(self.redis, keys, files)
            return {"model": env.model, "gone": len(env.items)}
        todo = self._pending_items(env, start.done)
        if not todo:
            self._after_store([(env, [])])
            return {"model": env.model, "duplicate": len(env.items)}
        if start.verdict is Verdict.DEAD:
            reason = f"started {start.attempts} times without finishing (max_attempts={self.settings.max_attempts})"
            log.error("dead-lettering %s: %s", env.describe(), reason)
            self.dead_letters.bury(env, start.attempts, reason)
            return {"model": env.model, "dead_lettered": len(todo)}
        with self.budget.hold(self._task_bytes(env)), tracing.batch_span("hetbatch.batch", (env.trace,)):
            done = self._run(env, todo)
            self._store([(env, done)])
        failed = sum(len(d.items) for d in done if d.error is not None)
        return {"model": env.ref, "items": len(todo), "failed": failed, "rows": env.rows}

    def _store(self, finished: Sequence[tuple[TaskEnvelope, list[Done]]]) -> None:
        """Write the outcomes of finished tasks (one round trip), then hand each on."""
        if not finished:
            return
        writes = [
            (outcomes_of(env, done, self.settings.max_result_bytes, self.writer.place), env.reply_to, task_id_of(env))
            for env, done in finished
        ]
        with tracing.child_span("hetbatch.store", {"hetbatch.tasks": len(writes)}):
            stored = self.writer.write_many(writes)
        duplicates = sum(len(outcomes) - n for (outcomes, _, _), n in zip(writes, stored, strict=True))
        if duplicates:  # another execution of the same items finished first
            self.ledger.count("duplicate_results", duplicates)
        self._after_store(finished)

    def _after_store(self, finished: Sequence[tuple[TaskEnvelope, Sequence[Done]]]) -> None:
        for hook in self.hooks:
            hook.after_store(finished)

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
        ref = env.ref
        self.arrivals.enter(ref)
        try:
            try:
                spec = self.models.spec(ref)
                arrays = table_to_arrays(self._table(env), spec.inputs)
                model = self.models.get(spec)
            except (redis.ConnectionError, redis.TimeoutError):
                raise  # not the job's fault: the task is requeued (the lane batch returned)
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
        pending = [(run, self._submit(model.batcher, arrays, run, env.trace)) for run in runs]
        return _Calls(outcomes, pending, arrays, spec, model, env.trace)

    def _collect(self, calls: _Calls) -> list[Done]:
        """Wait for the model requests ``_start`` made; every item's outcome."""
        outcomes = calls.outcomes
        for run, future in calls.pending:
            outcomes += self._finish(run, future, calls)
        return outcomes

    @staticmethod
    def _submit(
        batcher: Batcher, arrays: Mapping[str, np.ndarray], run: list[tuple[int, Item]], trace: str | None
    ) -> Future[Pieces]:
        start, rows = run[0][0], sum(item.rows for _, item in run)
        return batcher.submit({n: a[start : start + rows] for n, a in arrays.items()}, rows, trace)

    def _finish(self, run: list[tuple[int, Item]], future: Future[Pieces], calls: _Calls) -> list[Done]:
        """Outcomes of one run of items; a failed run of several is retried item by item,
        so the batcher's bisection finds the one job that makes the model raise."""
        arrays, spec, model = calls.arrays, calls.spec, calls.model
        assert arrays is not None and spec is not None and model is not None
        try:
            outputs = future.result(timeout=self.settings.task_timeout_s)
        except FutureTimeout:
            late = f"no model result within task_timeout_s={self.settings.task_timeout_s} s"
            return [_error(o, i, JobTimeout(i.job_id, late)) for o, i in run]
        except Exception as exc:
            if len(run) == 1:
                return [_error(run[0][0], run[0][1], exc, PredictError)]
            singles = [([one], self._submit(model.batcher, arrays, [one], calls.trace)) for one in run]
            return [o for single, fut in singles for o in self._finish(single, fut, calls)]
        table = self._select(outputs, spec)
        # Which device ran it: a gpu model with fallback = "cpu" may have run on a cpu worker.
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), DEVICE_KEY: model.adapter.device.encode()}
        )
        return [Done(run[0][0], [item for _, item in run], table=table)]

    @staticmethod
    def _select(pieces: Pieces, spec: ModelSpec) -> pa.Table:
        """The outputs the spec names, a record batch per piece of at least ``PIECE_BYTES``
        on average (a 614 MB result is not joined here, only written out: ``worker.results``)."""
        names = [n for n in spec.outputs if n in pieces[0]] or list(pieces[0])
        if sum(p[n].nbytes for p in pieces for n in names) < len(pieces) * PIECE_BYTES:
            pieces = [join(pieces)]  # many small calls (a batch-1 model): one copy costs less
        tables = [arrays_to_table({n: p[n] for n in names}) for p in pieces]
        if all(t.schema == tables[0].schema for t in tables[1:]):
            return pa.concat_tables(tables)
        whole = join(pieces)  # pieces typed apart (strings of one call, large strings of another)
        return arrays_to_table({n: whole[n] for n in names})

    def _table(self, env: TaskEnvelope) -> pa.Table:
        # Names derived from the job id, sizes checked before reading (protocol.transport).
        data = self.transport.read(self.redis, env)
        table = decode_table(data, max_bytes=self.settings.max_payload_bytes, max_rows=env.rows)
        if table.num_rows != env.rows:
            raise PayloadError(f"payload has {table.num_rows} rows, the envelope says {env.rows}")
        return table

    def _record_batch(self, spec: ModelSpec, stats: BatchStats) -> None:
        for hook in self.hooks:
            hook.after_batch(spec.ref, stats)

    def close(self) -> None:
        """Unload the models and close the Redis connection (hooks are their owner's to close)."""
        self.models.close()
        self.redis.close()
