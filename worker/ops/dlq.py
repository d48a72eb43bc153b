"""The dead-letter list: tasks that reached the attempt cap (``hetbatch dlq`` shows and retries them).

A task is dead-lettered when it was started ``max_attempts`` times without finishing
(each start killed its worker: a *poison* job) or when the reconciler finds it lost
again with its attempts spent. Its items without a result get a ``PoisonJob`` error
result, so the producer is told instead of waiting; the envelope stays in the ledger
so that ``hetbatch dlq retry`` can publish it again once the cause is fixed.

An entry that names no job it could be answered to (a lane entry or task body that is
not an envelope) is dead-lettered raw (``bury_raw``): its first ``RAW_KEEP_BYTES``
bytes, its size, the reason and the list it came from; ``hetbatch dlq list`` shows
it, and ``retry`` skips it (there is nothing to run).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis

from hetbatch.producers.errors import PayloadError, RemoteError
from hetbatch.producers.protocol.keys import Keys
from hetbatch.producers.protocol.ledger import task_id_of
from hetbatch.producers.protocol.wire import TaskEnvelope, pack_header
from hetbatch.worker.results import Done, Outcome, ResultWriter, outcomes_of

__all__ = ["POISON", "RAW_KEEP_BYTES", "DeadLetter", "DeadLetters"]

POISON = "PoisonJob"
RAW_KEEP_BYTES = 64 * 1024  # of an undecodable entry, kept for a post-mortem
RAW_PREFIX = "raw-"  # dead-letter ids of undecodable entries


@dataclass(frozen=True)
class DeadLetter:
    """One entry of the dead-letter list."""

    task_id: str
    model: str
    jobs: tuple[str, ...]
    attempts: int
    reason: str
    dead: float
    queue: str


class DeadLetters:
    """Bury, list, retry and purge dead-lettered tasks.

    Args:
        client: the Redis holding queues, ledger and results.
        keys: the deployment's key names.
        result_ttl_s: how long the ``PoisonJob`` error results live.
    """

    def __init__(self, client: redis.Redis, keys: Keys, *, result_ttl_s: int = 86_400) -> None:
        self.redis = client
        self.keys = keys
        self.writer = ResultWriter(client, keys, ttl_s=result_ttl_s, inline_bytes=65_536)
        self.result_ttl_s = result_ttl_s

    def bury(self, env: TaskEnvelope, attempts: int, reason: str, queue: str | None = None) -> list[Outcome]:
        """Store a ``PoisonJob`` error for each item of ``env`` without a result; list the task.

        Returns the outcomes written (items that had a result keep it).
        """
        task_id = task_id_of(env)
        error = RemoteError(
            POISON,
            f"{reason}; moved to the dead-letter list as task {task_id} "
            f"('hetbatch dlq list' shows it, 'hetbatch dlq retry {task_id}' runs it again)",
            {"task": task_id, "attempts": attempts},
        )
        outcomes = outcomes_of(env, [Done(0, list(env.items), error=error)], max_bytes=1 << 62)
        self.writer.write(outcomes, env.reply_to)
        key = self.keys.task(task_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            key,
            mapping={"env": json.dumps(env.to_dict()), "dead": time.time(), "reason": reason, "attempts": attempts},
        )
        if queue:
            pipe.hset(key, "queue", queue)
        pipe.expire(key, self.result_ttl_s)
        pipe.lrem(self.keys.dlq(), 0, task_id)
        pipe.lpush(self.keys.dlq(), task_id)
        pipe.zrem(self.keys.ledger(), task_id)
        pipe.hincrby(self.keys.reliability(), "dead_lettered", 1)
        pipe.execute()
        return outcomes

    def bury_raw(self, raw: bytes, reason: str, queue: str) -> str:
        """Dead-letter an entry that names no job (see the module docstring); returns its id.

        Raises:
            redis.RedisError: Redis is unreachable or refused the write.
        """
        task_id = f"{RAW_PREFIX}{uuid.uuid4().hex}"
        key = self.keys.task(task_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            key,
            mapping={"raw": raw[:RAW_KEEP_BYTES], "size": len(raw), "dead": time.time(), "reason": reason[:2000],
                     "queue": queue, "attempts": 0},
        )  # fmt: skip
        pipe.expire(key, self.result_ttl_s)
        pipe.lpush(self.keys.dlq(), task_id)
        pipe.hincrby(self.keys.reliability(), "dead_lettered_raw", 1)
        pipe.execute()
        return task_id

    def entries(self) -> list[DeadLetter]:
        """Dead-lettered tasks, newest first (entries whose ledger record expired are dropped)."""
        ids = [t.decode() for t in cast(list[bytes], self.redis.lrange(self.keys.dlq(), 0, -1))]
        pipe = self.redis.pipeline(transaction=False)
        for task_id in ids:
            pipe.hgetall(self.keys.task(task_id))
        out = []
        for task_id, raw in zip(ids, pipe.execute(), strict=True):
            if not raw or (b"env" not in raw and b"raw" not in raw):
                self.redis.lrem(self.keys.dlq(), 0, task_id)
                continue
            model, jobs = _describe(raw)
            out.append(
                DeadLetter(
                    task_id=task_id,
                    model=model,
                    jobs=jobs,
                    attempts=int(raw.get(b"attempts", 0)),
                    reason=raw.get(b"reason", b"").decode(),
                    dead=float(raw.get(b"dead", 0)),
                    queue=raw.get(b"queue", b"").decode(),
                )
            )
        return out

    def retry(self, task_ids: Sequence[str], publish: Any) -> list[str]:
        """Publish dead-lettered tasks again with a fresh attempt budget.

        Their ``PoisonJob`` results are deleted first (first write wins, so a stale
        error would otherwise stay the answer); genuine results are kept.

        Args:
            task_ids: tasks to retry (ids from ``entries``).
            publish: ``publish(envelope_dict, queue, task_id)``, e.g. ``Republisher.publish``.

        Returns:
            the ids actually retried (unknown ids are skipped).
        """
        retried = []
        for task_id in task_ids:
            raw = cast(dict[bytes, bytes], self.redis.hgetall(self.keys.task(task_id)))
            if b"env" not in raw or b"queue" not in raw:
                continue
            body = json.loads(raw[b"env"])
            env = TaskEnvelope.from_dict(body)
            result_keys = [self.keys.result(i.job_id, i.chunk) for i in env.units]
            stored = cast(list[bytes | None], self.redis.mget(result_keys))
            poisoned = [k for k, v in zip(result_keys, stored, strict=True) if v is not None and _is_poison(v)]
            pipe = self.redis.pipeline(transaction=True)
            if poisoned:
                pipe.delete(*poisoned)
            pipe.hset(self.keys.task(task_id), "attempts", 0)
            pipe.hdel(self.keys.task(task_id), "dead", "reason")
            pipe.lrem(self.keys.dlq(), 0, task_id)
            pipe.zadd(self.keys.ledger(), {task_id: time.time()})
            pipe.execute()
            publish(body, raw[b"queue"].decode(), task_id)
            retried.append(task_id)
        return retried

    def purge(self, task_ids: Sequence[str] | None = None) -> int:
        """Forget dead-lettered tasks (all when ``task_ids`` is None); returns how many."""
        ids = (
            list(task_ids)
            if task_ids is not None
            else [t.decode() for t in cast(list[bytes], self.redis.lrange(self.keys.dlq(), 0, -1))]
        )
        pipe = self.redis.pipeline(transaction=True)
        for task_id in ids:
            pipe.lrem(self.keys.dlq(), 0, task_id)
            pipe.delete(self.keys.task(task_id))
        pipe.execute()
        return len(ids)


def _describe(record: dict[bytes, bytes]) -> tuple[str, tuple[str, ...]]:
    """``(model, job ids)`` of a dead-letter record; ``("-", ())`` for a raw entry or one
    recorded by a producer of another schema (the task id still names it)."""
    if b"env" not in record:
        return "-", ()
    try:
        env = TaskEnvelope.from_dict(json.loads(record[b"env"]))
    except (ValueError, PayloadError):
        return "-", ()
    return env.ref, tuple(i.job_id for i in env.items)


def _is_poison(stored: bytes) -> bool:
    if stored[:1] == b"P":
        try:
            return any(isinstance(n, RemoteError) and n.type == POISON for n in pack_header(stored))
        except PayloadError:
            return False
    if stored[:1] != b"E":
        return False
    try:
        return bool(json.loads(stored[1:]).get("type") == POISON)
    except ValueError:
        return False
