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
                              duplicate_results, republished, dead_lettered

A task id is derived from the envelope's first item (``<job_id>.<chunk>``), so the
producer, the Celery message and the worker agree on it without another field.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis

from hetbatch.producers.protocol.wire import Keys, TaskEnvelope

__all__ = ["Attempt", "Ledger", "LedgerKeys", "Start", "task_id_of"]


def task_id_of(env: TaskEnvelope) -> str:
    """The task id of an envelope: its first item's ``<job_id>.<chunk>`` (unique per task)."""
    first = env.items[0]
    return f"{first.job_id}.{first.chunk}"


@dataclass(frozen=True)
class LedgerKeys:
    """Key names of the ledger (see the module docstring)."""

    prefix: str = "hb"

    def task(self, task_id: str) -> str:
        return f"{self.prefix}:task:{task_id}"

    def ledger(self) -> str:
        return f"{self.prefix}:ledger"

    def attempts(self, job_id: str) -> str:
        return f"{self.prefix}:att:{job_id}"

    def dlq(self) -> str:
        return f"{self.prefix}:dlq"

    def stats(self) -> str:
        return f"{self.prefix}:reliability"

    def leader(self) -> str:
        return f"{self.prefix}:reconciler:leader"


@dataclass(frozen=True)
class Attempt:
    """One start of one job chunk by a worker."""

    chunk: int
    number: int
    worker: str
    started: float
    task_id: str


@dataclass(frozen=True)
class Start:
    """What the ledger said when a worker asked to start a task.

    ``verdict``: ``run`` (attempt recorded), ``done`` (every item has a result: a
    duplicate delivery), ``suspect`` (attempted before, so it may have killed a worker:
    run it in isolation and ask again with ``claim``), ``dead`` (attempt cap reached).
    """

    verdict: str
    attempts: int
    done: tuple[bool, ...]


# KEYS[1] task hash, KEYS[2] stats hash, then (result key, attempts key) per item.
# ARGV: ttl_ms, claim (0/1), cap, worker, now, task_id, then one chunk number per item.
_BEGIN = """
local ttl, claim, cap = tonumber(ARGV[1]), ARGV[2] == '1', tonumber(ARGV[3])
local n = (#KEYS - 2) / 2
local done, pending = {}, 0
for i = 1, n do
  done[i] = redis.call('EXISTS', KEYS[1 + 2 * i])
  if done[i] == 0 then pending = pending + 1 end
end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
if pending == 0 then
  redis.call('HINCRBY', KEYS[2], 'duplicate_deliveries', 1)
  return {'done', attempts, unpack(done)}
end
if attempts > 0 and not claim then return {'suspect', attempts, unpack(done)} end
if attempts >= cap then return {'dead', attempts, unpack(done)} end
attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('PEXPIRE', KEYS[1], ttl)
local dups = 0
for i = 1, n do
  if done[i] == 0 then
    local akey, chunk = KEYS[2 + 2 * i], ARGV[6 + i]
    local count = redis.call('HINCRBY', akey, chunk, 1)
    if count > 1 then dups = dups + 1 end
    local record = cjson.encode({worker = ARGV[4], started = ARGV[5], task = ARGV[6], attempt = count})
    redis.call('HSET', akey, chunk .. ':' .. count, record)
    redis.call('PEXPIRE', akey, ttl)
  end
end
redis.call('HINCRBY', KEYS[2], 'attempts', pending)
if dups > 0 then redis.call('HINCRBY', KEYS[2], 'duplicates', dups) end
return {'run', attempts, unpack(done)}
"""


class Ledger:
    """Read and write the ledger in one Redis.

    Args:
        client: the Redis holding the queues.
        keys: the deployment's key names (its prefix is the ledger's).
    """

    def __init__(self, client: redis.Redis, keys: Keys | None = None) -> None:
        self.redis = client
        self.keys = keys or Keys()
        self.lk = LedgerKeys(self.keys.prefix)
        self._begin = client.register_script(_BEGIN)

    # -- producer side ---------------------------------------------------------

    def record(self, pipe: Any, env: TaskEnvelope, queue: str, ttl_s: int, body: dict[str, Any] | None = None) -> str:
        """Queue (on ``pipe``) the ledger entry of a task about to be published; returns the
        envelope as the JSON text recorded (``body``: ``env.to_dict()``, when the caller has it)."""
        task_id = task_id_of(env)
        key = self.lk.task(task_id)
        now = time.time()
        text = json.dumps(env.to_dict() if body is None else body)
        pipe.hset(key, mapping={"env": text, "queue": queue, "published": now})
        pipe.expire(key, ttl_s)
        pipe.zadd(self.lk.ledger(), {task_id: now})
        return text

    def forget(self, envs: Sequence[TaskEnvelope]) -> None:
        """Best effort: drop the entries of tasks that could not be published."""
        try:
            pipe = self.redis.pipeline(transaction=False)
            for env in envs:
                pipe.zrem(self.lk.ledger(), task_id_of(env))
                pipe.delete(self.lk.task(task_id_of(env)))
            pipe.execute()
        except redis.RedisError:
            pass  # Redis is down too; overdue entries of unpublished tasks are then published late

    def attempts(self, job_id: str) -> list[Attempt]:
        """Every recorded start of the job's chunks, in chunk and attempt order."""
        raw = cast(dict[bytes, bytes], self.redis.hgetall(self.lk.attempts(job_id)))
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
        raw = cast(dict[bytes, bytes], self.redis.hgetall(self.lk.stats()))
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
        keys: list[str] = [self.lk.task(task_id), self.lk.stats()]
        chunks: list[str] = []
        for item in env.units:
            keys += [self.keys.result(item.job_id, item.chunk), self.lk.attempts(item.job_id)]
            chunks.append(str(item.chunk))
        return keys, [ttl_s * 1000, int(claim), max_attempts, worker, repr(time.time()), task_id, *chunks]

    def count(self, name: str, amount: int = 1) -> None:
        """Add to a reliability counter."""
        self.redis.hincrby(self.lk.stats(), name, amount)


def _start(reply: Any) -> Start:
    verdict = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
    return Start(verdict, int(reply[1]), tuple(bool(d) for d in reply[2:]))
