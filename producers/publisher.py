"""Publishing: one all-or-nothing round trip, with retries, for every way a job goes out.

``submit``, ``submit_many``, ensembles and the lane all publish the same way: the
commands of one round trip (payload keys, the job's record, the ledger entries of its
tasks, the task messages) are recorded in a ``Batch`` and sent by ``Publisher.send``
as one MULTI/EXEC transaction, so Redis holds all of them or none of them, also across
a crash (with AOF on, Redis drops a transaction cut short when it reloads).

A try that fails on the connection has an unknown outcome: EXEC may have run before
the connection broke. The next try first asks whether the batch's ledger entry exists
(it is written by the transaction only); if it does, the first try committed and
nothing is sent again. Sending again is safe anyway: payload ``SET``, the job record
and the ledger entry are idempotent, and a second copy of a task message is absorbed
by the worker's ledger check (``Ledger.begin``: ``done`` once its results exist) and
by first-write-wins result storage (``worker.results``).

The commands are recorded rather than queued on a redis-py pipeline because a
pipeline empties its command stack when ``execute()`` fails: a retry of the same
pipeline sends nothing and looks like success.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import pyarrow as pa
import redis
from celery import Celery

from hetbatch.producers.errors import BrokerError, ConfigError
from hetbatch.producers.protocol import tracing
from hetbatch.producers.protocol.ensemble import EnsembleSpec, plan_stage
from hetbatch.producers.protocol.keys import Keys, lane_list
from hetbatch.producers.protocol.kombu import TRANSPORT_OPTIONS, celery_message, priority_list
from hetbatch.producers.protocol.ledger import Ledger, task_id_of
from hetbatch.producers.protocol.registry import Spec, as_model
from hetbatch.producers.protocol.sentinel import broker
from hetbatch.producers.protocol.transport import Transport
from hetbatch.producers.protocol.wire import CELERY_WIRE_CONFIG, TASK_NAME, TaskEnvelope

__all__ = ["Batch", "Publisher", "make_producer_app", "priority_level", "safe_url"]

_Call = tuple[str, tuple[Any, ...], dict[str, Any]]
_PRIORITIES = {"high": 0, "normal": 5, "low": 9}


def priority_level(name: str) -> int:
    """The queue priority step of ``high``, ``normal`` or ``low`` (0 is served first).

    Raises:
        ValueError: any other name.
    """
    level = _PRIORITIES.get(name)
    if level is None:
        raise ValueError(f"priority must be one of {sorted(_PRIORITIES)}, not {name!r}")
    return level


def make_producer_app(url: str) -> Celery:
    """A Celery app that only publishes: JSON messages, no result backend."""
    broker_url, broker_options = broker(url)  # a sentinel:// URL names its master group
    app = Celery("hetbatch-producer", broker=broker_url, set_as_current=False)
    app.conf.update(
        CELERY_WIRE_CONFIG,
        broker_connection_retry_on_startup=True,
        task_create_missing_queues=True,
        broker_transport_options=dict(TRANSPORT_OPTIONS) | broker_options,
    )
    return app


def safe_url(client: redis.Redis) -> str:
    """``host:port/db`` of ``client`` (``sentinel:group/db`` for a Sentinel-managed one),
    without credentials (for error messages)."""
    kw = client.connection_pool.connection_kwargs
    group = getattr(client.connection_pool, "service_name", None)  # redis-py's SentinelConnectionPool
    if group is not None:
        return f"sentinel:{group}/{kw.get('db', 0)}"
    return f"{kw.get('host', '?')}:{kw.get('port', '?')}/{kw.get('db', 0)}"


class Batch:
    """The Redis commands of one publishing round trip, recorded so that every try can
    send them anew. Has the few command methods publishing uses (those of a pipeline).

    Args:
        trace: the ``traceparent`` every envelope enqueued in it carries (``Publisher.submitting``).
    """

    def __init__(self, trace: str | None = None) -> None:
        self.trace = trace
        self.calls: list[_Call] = []
        self.envelopes: list[TaskEnvelope] = []
        # A key only this batch's transaction writes: its existence says it committed.
        self.probe: str | None = None

    def __len__(self) -> int:
        return len(self.calls)

    def clear(self) -> None:
        self.calls.clear()
        self.envelopes.clear()
        self.probe = None

    def replay(self, pipe: Any) -> None:
        """Queue every recorded command on ``pipe``."""
        for name, args, kwargs in self.calls:
            getattr(pipe, name)(*args, **kwargs)

    def _add(self, name: str, *args: Any, **kwargs: Any) -> Batch:
        self.calls.append((name, args, kwargs))
        return self

    def execute_command(self, *args: Any, **options: Any) -> Batch:
        return self._add("execute_command", *args, **options)

    def set(self, name: str, value: Any, ex: int | None = None) -> Batch:
        return self._add("set", name, value, ex=ex)

    def hset(self, name: str, mapping: dict[str, Any]) -> Batch:
        return self._add("hset", name, mapping=mapping)

    def expire(self, name: str, time_s: int) -> Batch:
        return self._add("expire", name, time_s)

    def zadd(self, name: str, mapping: dict[str, float]) -> Batch:
        return self._add("zadd", name, mapping)

    def lpush(self, name: str, *values: Any) -> Batch:
        return self._add("lpush", name, *values)


class Publisher:
    """Records jobs and their tasks in a ``Batch`` and sends it all-or-nothing.

    Args:
        client: the Redis holding the queues.
        keys: the deployment's key names.
        ledger: where each task is recorded before it is published.
        transport: stores inputs by key (ensemble stages).
        retries: tries of one round trip before ``BrokerError``.
        input_ttl_s: seconds a ledger entry (like a payload) waits for a worker.
        result_ttl_s: seconds a job's record is kept.
        trace_submits: turn tracing on for this process (``ClientSettings.tracing``); a
            publisher without it does not turn it off for the others.
        replicas: (replicas, timeout in ms) that must acknowledge each round trip
            (``WAIT``) before ``send`` returns; (0, _) does not wait.
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        ledger: Ledger,
        transport: Transport,
        *,
        retries: int,
        input_ttl_s: int,
        result_ttl_s: int,
        trace_submits: bool = False,
        replicas: tuple[int, int] = (0, 0),
    ) -> None:
        if trace_submits:
            tracing.configure(True)
        if replicas[0] < 0 or (replicas[0] > 0 and replicas[1] < 1):
            # WAIT with timeout 0 blocks for ever; a negative one fails after the transaction ran.
            raise ConfigError(
                f"wait_replicas={replicas[0]}, wait_timeout_ms={replicas[1]}: wait_replicas must be 0 or more "
                "and, when set, wait_timeout_ms at least 1"
            )
        self._client = client
        self._keys = keys
        self._ledger = ledger
        self._transport = transport
        self._retries = max(1, retries)
        self._input_ttl_s = input_ttl_s
        self._result_ttl_s = result_ttl_s
        self._replicas = replicas

    def record(
        self, batch: Batch, unit: str, model: str, chunks: int, rows: int, pack: list[int] | None = None
    ) -> None:
        """The record of a job (or of a pack: its jobs' rows), published with its tasks."""
        meta: dict[str, Any] = {"model": model, "chunks": chunks, "rows": rows, "created": time.time()}
        if pack is not None:
            meta["pack"] = pack
        # execute_command skips redis-py's per-call argument wrappers.
        batch.execute_command("SET", self._keys.job(unit), json.dumps(meta), "EX", self._result_ttl_s)

    @contextmanager
    def submitting(self, attributes: dict[str, str | int]) -> Iterator[Batch]:
        """A ``Batch`` for one submit, inside its ``hetbatch.submit`` span (tracing on): every
        envelope enqueued in it carries the span's ``traceparent``, for the worker's links."""
        with tracing.submit_span("hetbatch.submit", attributes) as trace:
            yield Batch(trace)

    def enqueue(self, batch: Batch, queue: str, env: TaskEnvelope, level: int, *, lane: bool = False) -> None:
        """The task's ledger entry, then its message (or, on the lane, its bare envelope)."""
        if batch.trace is not None and env.trace is None:
            env = replace(env, trace=batch.trace)
        body = env.to_dict()
        # Recorded in the same transaction as the message: a message lost later (a worker
        # killed holding it) is published again from the ledger.
        text = self._ledger.record(batch, env, queue, self._input_ttl_s, body)
        if lane:
            batch.lpush(lane_list(queue), text)
        else:
            message = celery_message(TASK_NAME, [body], queue, level, env.describe(), task_id_of(env))
            batch.lpush(priority_list(queue, level), message)
        if batch.probe is None:
            batch.probe = self._keys.task(task_id_of(env))
        batch.envelopes.append(env)

    def ensemble(
        self,
        batch: Batch,
        spec: EnsembleSpec,
        job_id: str,
        parts: Sequence[pa.Table],
        models: Callable[[str], Spec],
        reply_to: str,
        deadline: float | None,
        level: int,
    ) -> None:
        """Publish ensemble job ``job_id``, whose chunks are ``parts``: per chunk its stage
        input, stored once, and the first stage's member tasks on the members' own
        queues, in one round trip per chunk (workers start on early chunks of a big job).
        The workers fuse and write the result under the job's id (``protocol.ensemble``).

        Raises:
            SchemaMismatch: the input cannot be cast to a member's inputs.
            PayloadTooLarge, BrokerError.
        """
        for chunk, table in enumerate(parts):
            plan = plan_stage(
                spec,
                job_id=job_id,
                chunk=chunk,
                stage=0,
                table=table,
                models=lambda ref: as_model(models(ref)),
                keys=self._keys,
                reply_to=reply_to,
                deadline=deadline,
                priority=level,
            )
            for key, blob in plan.blobs.items():
                self._transport.store(batch, key, blob)
            for queue, env in plan.tasks:
                self.enqueue(batch, queue, env, level)
            self.send(batch)

    def send(self, batch: Batch) -> None:
        """Send ``batch`` as one transaction, retrying connection errors with backoff;
        the batch is empty afterwards.

        Raises:
            BrokerError: Redis stayed unreachable for every try, or refused the
                transaction (out of memory, read-only replica, ACL): nothing of the
                batch is in Redis, or (an unknown outcome on the last try) all of it.
        """
        if not batch.calls:
            return
        unknown = False
        waits = self._replicas[0] > 0
        for attempt in range(self._retries):
            try:
                # Waiting for replicas, a committed try is sent again instead (idempotent): WAIT
                # counts only the writes of its own connection.
                if unknown and not waits and batch.probe is not None and self._client.exists(batch.probe):
                    break  # the try before committed: its connection broke after EXEC ran
                pipe = _Replicated(self._client, self._replicas) if waits else self._client.pipeline(transaction=True)
                batch.replay(pipe)
                pipe.execute()
                if isinstance(pipe, _Replicated) and pipe.refused is not None:
                    batch.clear()
                    raise BrokerError(
                        f"Redis at {safe_url(self._client)} ran the submit but refused WAIT ({pipe.refused}): the "
                        "master may run the job, but nothing says a replica has it; allow WAIT (ACL, proxy) or "
                        "set wait_replicas=0"
                    )
                if isinstance(pipe, _Replicated) and pipe.acked < self._replicas[0]:
                    batch.clear()
                    raise BrokerError(
                        f"{pipe.acked} of {self._replicas[0]} replicas of {safe_url(self._client)} confirmed the "
                        f"submit within {self._replicas[1]} ms (wait_replicas): the master may still run it, but "
                        "loses it if it fails first; check the replicas (INFO replication), then submit again"
                    )
                break
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                unknown = True
                if attempt + 1 == self._retries:
                    batch.clear()
                    raise BrokerError(
                        f"Redis at {safe_url(self._client)} unreachable after {self._retries} tries: {exc}; "
                        "is it running? (the job was not submitted, or submitted whole)"
                    ) from exc
                time.sleep(0.1 * 2**attempt)
            except redis.ResponseError as exc:
                # EXECABORT (out of memory, NOPERM, READONLY): nothing was applied. A command
                # failing inside EXEC (a queue list overwritten with a string) may leave the others.
                batch.clear()
                raise BrokerError(f"Redis at {safe_url(self._client)} refused the submit: {exc}") from exc
        batch.clear()


class _Replicated(redis.client.Pipeline):
    """A MULTI/EXEC pipeline followed by ``WAIT replicas timeout`` on the same connection
    (``WAIT`` counts the writes of its own connection; inside MULTI it would not block).
    ``acked`` is how many replicas confirmed the transaction; ``refused`` is Redis's error
    when it ran the transaction but refused WAIT (an ACL without it, a proxy)."""

    def __init__(self, client: redis.Redis, replicas: tuple[int, int]) -> None:
        super().__init__(client.connection_pool, client.response_callbacks, True, None)
        self._wait = replicas
        self.acked = 0
        self.refused: str | None = None

    def _execute_transaction(self, connection: Any, commands: Any, raise_on_error: bool) -> list[Any]:
        replies: list[Any] = super()._execute_transaction(connection, commands, raise_on_error)
        connection.send_command("WAIT", *self._wait)
        try:
            self.acked = int(connection.read_response())
        except redis.ResponseError as exc:  # the transaction ran: not "refused the submit"
            self.refused = str(exc)
        return replies
