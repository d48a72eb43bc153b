"""The dead-letter list: tasks that reached the attempt cap, and the ``hetbatch dlq`` command.

A task is dead-lettered when it was started ``max_attempts`` times without finishing
(each start killed its worker: a *poison* job) or when the reconciler finds it lost
again with its attempts spent. Its items without a result get a ``PoisonJob`` error
result, so the producer is told instead of waiting; the envelope stays in the ledger
so that ``hetbatch dlq retry`` can publish it again once the cause is fixed.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis

from hetbatch.producers.errors import PayloadError, RemoteError
from hetbatch.producers.protocol.ledger import LedgerKeys, task_id_of
from hetbatch.producers.protocol.wire import Keys, TaskEnvelope, pack_header
from hetbatch.worker.results import Done, Outcome, ResultWriter, outcomes_of

__all__ = ["DeadLetter", "DeadLetters", "add_parser"]

POISON = "PoisonJob"


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
        self.lk = LedgerKeys(keys.prefix)
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
        key = self.lk.task(task_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            key,
            mapping={"env": json.dumps(env.to_dict()), "dead": time.time(), "reason": reason, "attempts": attempts},
        )
        if queue:
            pipe.hset(key, "queue", queue)
        pipe.expire(key, self.result_ttl_s)
        pipe.lrem(self.lk.dlq(), 0, task_id)
        pipe.lpush(self.lk.dlq(), task_id)
        pipe.zrem(self.lk.ledger(), task_id)
        pipe.hincrby(self.lk.stats(), "dead_lettered", 1)
        pipe.execute()
        return outcomes

    def entries(self) -> list[DeadLetter]:
        """Dead-lettered tasks, newest first (entries whose ledger record expired are dropped)."""
        ids = [t.decode() for t in cast(list[bytes], self.redis.lrange(self.lk.dlq(), 0, -1))]
        pipe = self.redis.pipeline(transaction=False)
        for task_id in ids:
            pipe.hgetall(self.lk.task(task_id))
        out = []
        for task_id, raw in zip(ids, pipe.execute(), strict=True):
            if not raw or b"env" not in raw:
                self.redis.lrem(self.lk.dlq(), 0, task_id)
                continue
            env = json.loads(raw[b"env"])
            try:
                jobs = tuple(i.job_id for i in TaskEnvelope.from_dict(env).items)
            except PayloadError:
                jobs = ()  # recorded by a producer of another schema: the task id still names it
            out.append(
                DeadLetter(
                    task_id=task_id,
                    model=f"{env['model']}@{env['version']}",
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
            raw = cast(dict[bytes, bytes], self.redis.hgetall(self.lk.task(task_id)))
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
            pipe.hset(self.lk.task(task_id), "attempts", 0)
            pipe.hdel(self.lk.task(task_id), "dead", "reason")
            pipe.lrem(self.lk.dlq(), 0, task_id)
            pipe.zadd(self.lk.ledger(), {task_id: time.time()})
            pipe.execute()
            publish(body, raw[b"queue"].decode(), task_id)
            retried.append(task_id)
        return retried

    def purge(self, task_ids: Sequence[str] | None = None) -> int:
        """Forget dead-lettered tasks (all when ``task_ids`` is None); returns how many."""
        ids = (
            list(task_ids)
            if task_ids is not None
            else [t.decode() for t in cast(list[bytes], self.redis.lrange(self.lk.dlq(), 0, -1))]
        )
        pipe = self.redis.pipeline(transaction=True)
        for task_id in ids:
            pipe.lrem(self.lk.dlq(), 0, task_id)
            pipe.delete(self.lk.task(task_id))
        pipe.execute()
        return len(ids)


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


def _cmd_dlq(args: argparse.Namespace) -> int:
    from hetbatch.producers.settings import ClientSettings
    from hetbatch.worker.ops.reconciler import Republisher

    settings = ClientSettings.from_env(redis_url=args.redis_url)
    client = redis.Redis.from_url(settings.redis_url)
    dlq = DeadLetters(client, Keys(settings.prefix), result_ttl_s=settings.result_ttl_s)
    try:
        if args.action == "list":
            entries = dlq.entries()
            if not entries:
                print("the dead-letter list is empty")
            for e in entries:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.dead))
                print(f"{e.task_id}  {e.model}  jobs={len(e.jobs)}  attempts={e.attempts}  {when}  {e.reason}")
        elif args.action == "retry":
            ids = args.task_ids or [e.task_id for e in dlq.entries()]
            with Republisher(settings.redis_url) as pub:
                done = dlq.retry(ids, pub.publish)
            print(f"retried {len(done)} task(s)")
        else:
            print(f"purged {dlq.purge(args.task_ids or None)} task(s)")
    finally:
        client.close()
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``hetbatch dlq list|retry|purge [TASK_ID...]`` (retry and purge: all when none given)."""
    p = sub.add_parser("dlq", help="list, retry or purge dead-lettered (poison) jobs")
    p.add_argument("action", choices=["list", "retry", "purge"])
    p.add_argument("task_ids", nargs="*", help="task ids (default: every dead-lettered task)")
    p.set_defaults(func=_cmd_dlq)
