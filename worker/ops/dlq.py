"""The dead-letter list: tasks that reached the attempt cap (``hetbatch dlq`` shows and retries them).

A task is dead-lettered when it was started ``max_attempts`` times without finishing
(each start killed its worker: a *poison* job) or when the reconciler finds it lost
again with its attempts spent. Its items without a result get a ``PoisonJob`` error
result, so the producer is told instead of waiting; the envelope stays in the ledger
so that ``hetbatch dlq retry`` can publish it again once the cause is fixed.

An entry that names no job it could be answered to (a lane entry or task body that is
not an envelope) is dead-lettered raw (``bury_raw``): its first ``RAW_KEEP_BYTES``
bytes, its size, the reason, the list it came from, and the ids of the jobs it names
when they can be read (``named_jobs``: a frame's or lane entry's ``items``, though a
field before them was too big to keep); ``hetbatch dlq list`` shows it, and ``retry``
skips it (there is nothing to run).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis

from hetbatch.producers.errors import PayloadError, RemoteError
from hetbatch.producers.protocol.fields import answerable_fields
from hetbatch.producers.protocol.keys import Keys
from hetbatch.producers.protocol.ledger import task_id_of
from hetbatch.producers.protocol.wire import TaskEnvelope, pack_header
from hetbatch.worker.results import Done, Outcome, ResultWriter, outcomes_of

__all__ = ["POISON", "RAW_KEEP_BYTES", "DeadLetter", "DeadLetters", "named_jobs"]

POISON = "PoisonJob"
RAW_KEEP_BYTES = 64 * 1024  # of an undecodable entry, kept for a post-mortem
RAW_PREFIX = "raw-"  # dead-letter ids of undecodable entries
# Entries up to this size are read for the job ids they name; a bigger one is kept cut,
# without ids: a lane entry over its size limit was refused unparsed to bound memory.
_NAMES_SCAN_BYTES = 4 << 20
_NAMES_KEPT = 100  # job ids kept per dead-letter entry


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
        """Dead-letter an entry that cannot be run or answered as a task (see the module
        docstring), with the job ids it still names; returns its id.

        Raises:
            redis.RedisError: Redis is unreachable or refused the write.
        """
        task_id = f"{RAW_PREFIX}{uuid.uuid4().hex}"
        key = self.keys.task(task_id)
        # Only the first RAW_KEEP_BYTES are kept: a huge field before ``items`` would cut
        # the job ids off, so they are stored on their own.
        jobs = named_jobs(raw)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            key,
            mapping={"raw": raw[:RAW_KEEP_BYTES], "size": len(raw), "dead": time.time(), "reason": reason[:2000],
                     "queue": queue, "attempts": 0, "jobs": json.dumps(jobs)},
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
    """``(model, job ids)`` of a dead-letter record; for a raw entry the ids it names
    (``named_jobs``); ``("-", ())`` for one recorded by a producer of another schema (the
    task id still names it)."""
    if b"env" not in record:
        try:
            jobs = json.loads(record.get(b"jobs", b"[]"))
        except ValueError:
            return "-", ()
        return "-", tuple(str(j) for j in jobs) if isinstance(jobs, list) else ()
    try:
        env = TaskEnvelope.from_dict(json.loads(record[b"env"]))
    except (ValueError, PayloadError):
        return "-", ()
    return env.ref, tuple(i.job_id for i in env.items)


def named_jobs(raw: bytes) -> list[str]:
    """The job ids (at most ``_NAMES_KEPT``, pack ids as the pack) that an entry refused as
    a whole names, when they can be read: a lane entry's, or the envelope's in a kombu
    frame's body; [] for anything else. Never raises: hostile bytes of any kind come here."""
    if len(raw) > _NAMES_SCAN_BYTES:
        return []
    try:
        data = json.loads(raw)
        if isinstance(data, dict) and "body" in data and "items" not in data and "pack" not in data:
            body = data["body"]
            if isinstance(data.get("properties"), dict) and data["properties"].get("body_encoding") == "base64":
                body = base64.b64decode(body, validate=True)
            data = json.loads(body)[0][0]
        found = answerable_fields(data)
    except (ValueError, TypeError, KeyError, IndexError, binascii.Error, RecursionError):
        return []
    if found is None:
        return []
    items, _, pack = found
    if pack is not None:
        return [pack]
    return list(dict.fromkeys(job for job, _, _ in items))[:_NAMES_KEPT]


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
