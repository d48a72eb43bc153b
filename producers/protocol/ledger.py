"""The job ledger: what was published, how often each job was attempted, what was dead-lettered.

Producers record every task before publishing it; workers record every attempt when
they start an item; the reconciler and the dead-letter list read both. Layout, under
the deployment prefix ``p``::

    p:task:<task_id>   hash   env (envelope JSON), queue, published (unix s), attempts,
                              and once dead-lettered: dead (unix s), reason
    p:ledger           zset   task_id -> when to look at it next (unix s)
    p:att:<job_id>     hash   "<chunk>" -> attempt count, "<chunk>:<n>" -> attempt record JSON
    p:dlq              list   dead-lettered task ids, newest first
    p:reliability      hash   counters: attempts, duplicates, duplicate_deliveries,
                              duplicate_results, republished, dead_lettered,
                              gone_deliveries (deliveries of deleted or purged jobs, dropped)

A task id is derived from the envelope's first item (``<job_id>.<chunk>``), so the
producer, the Celery message and the worker agree on it without another field.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, cast

import redis

from hetbatch.producers.protocol.keys import Keys
from hetbatch.producers.protocol.scripts import script
from hetbatch.producers.protocol.wire import TaskEnvelope

__all__ = ["Attempt", "Ledger", "Start", "Verdict", "task_id_of"]


def task_id_of(env: TaskEnvelope) -> str:
    """The task id of an envelope: its first item's ``<job_id>.<chunk>`` (unique per task)."""
    first = env.items[0]
    return f"{first.job_id}.{first.chunk}"


@dataclass(frozen=True)
class Attempt:
    """One start of one job chunk by a worker."""

    chunk: int
    number: int
    worker: str
    started: float
    task_id: str


class Verdict(str, Enum):
    """What the ledger says when a worker asks to start a task."""

    RUN = "run"
    """The attempt is recorded: run it."""
    DONE = "done"
    """Every item has a result already: a duplicate delivery."""
    SUSPECT = "suspect"
    """Attempted before, so it may have killed a worker: run it in isolation and ask again with ``claim``."""
    DEAD = "dead"
    """The attempt cap is reached: dead-letter it."""
    GONE = "gone"
    """Deleted or purged (``Keys.gone``): drop it without running or answering it."""


@dataclass(frozen=True)
class Start:
    """What the ledger said when a worker asked to start a task (``verdict``), how many
    times it was started, and per unit (``TaskEnvelope.units``) whether it has a result
    or a tombstone (either way: not to run)."""

    verdict: Verdict
    attempts: int
    done: tuple[bool, ...]


class Ledger:
    """Read and write the ledger in one Redis.

    Args:
        client: the Redis holding the queues.
        keys: the deployment's key names (its prefix is the ledger's).
    """

    def __init__(self, client: redis.Redis, keys: Keys | None = None) -> None:
        self.redis = client
        self.keys = keys or Keys()
        self._begin = script(client, "ledger_begin")

    # -- producer side ---------------------------------------------------------

    def record(self, pipe: Any, env: TaskEnvelope, queue: str, ttl_s: int, body: dict[str, Any] | None = None) -> str:
        """Queue (on ``pipe``) the ledger entry of a task about to be published; returns the
        envelope as the JSON text recorded (``body``: ``env.to_dict()``, when the caller has it)."""
        task_id = task_id_of(env)
        key = self.keys.task(task_id)
        now = time.time()
        text = json.dumps(env.to_dict() if body is None else body)
        pipe.hset(key, mapping={"env": text, "queue": queue, "published": now})
        pipe.expire(key, ttl_s)
        pipe.zadd(self.keys.ledger(), {task_id: now})
        return text

    def forget(self, envs: Sequence[TaskEnvelope]) -> None:
        """Best effort: drop the entries of tasks that could not be published."""
        try:
            pipe = self.redis.pipeline(transaction=False)
            for env in envs:
                pipe.zrem(self.keys.ledger(), task_id_of(env))
                pipe.delete(self.keys.task(task_id_of(env)))
            pipe.execute()
        except redis.RedisError:
            pass  # Redis is down too; overdue entries of unpublished tasks are then published late

    def attempts(self, job_id: str) -> list[Attempt]:
        """Every recorded start of the job's chunks, in chunk and attempt order."""
        raw = cast(dict[bytes, bytes], self.redis.hgetall(self.keys.attempts(job_id)))
        out = []
        for field, value in raw.items():
            if b":" not in field:
                continue
            rec = json.loads(value)
            chunk = int(field.split(b":", 1)[0])
            out.append(Attempt(chunk, int(rec["attempt"]), str(rec["worker"]), float(rec["started"]), str(rec["task"])))
        return sorted(out, key=lambda a: (a.chunk, a.number))

    def counters(self) -> dict[str, float]:
        """The reliability counters (attempts, duplicates, republished, dead_lettered, ...)."""
        raw = cast(dict[bytes, bytes], self.redis.hgetall(self.keys.reliability()))
        return {k.decode(): float(v) for k, v in raw.items()}

    # -- worker side -----------------------------------------------------------

    def begin(self, env: TaskEnvelope, *, worker: str, ttl_s: int, max_attempts: int, claim: bool = False) -> Start:
        """Check which items are done and, unless told otherwise, record an attempt: one round trip.

        A task attempted before is only claimed with ``claim=True`` (the caller runs it in
        isolation, so that a job that kills workers takes no innocent job with it).
        """
        keys, args = self._begin_call(env, worker, ttl_s, max_attempts, claim)
        return _start(self._begin(keys=keys, args=args))

    def begin_many(self, envs: Sequence[TaskEnvelope], *, worker: str, ttl_s: int, max_attempts: int) -> list[Start]:
        """``begin`` (without ``claim``) for several tasks in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for env in envs:
            keys, args = self._begin_call(env, worker, ttl_s, max_attempts, False)
            self._begin(keys=keys, args=args, client=pipe)
        return [_start(reply) for reply in pipe.execute()]

    def _begin_call(
        self, env: TaskEnvelope, worker: str, ttl_s: int, max_attempts: int, claim: bool
    ) -> tuple[list[str], list[str | int]]:
        task_id = task_id_of(env)
        keys: list[str] = [self.keys.task(task_id), self.keys.reliability()]
        chunks: list[str] = []
        for item in env.units:
            unit = item.job_id
            keys += [self.keys.result(unit, item.chunk), self.keys.attempts(unit), self.keys.gone(unit)]
            chunks.append(str(item.chunk))
        return keys, [ttl_s * 1000, int(claim), max_attempts, worker, repr(time.time()), task_id, *chunks]

    def count(self, name: str, amount: int = 1) -> None:
        """Add to a reliability counter."""
        self.redis.hincrby(self.keys.reliability(), name, amount)


def _start(reply: Any) -> Start:
    verdict = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
    return Start(Verdict(verdict), int(reply[1]), tuple(bool(d) for d in reply[2:]))
