"""The reconciler: finds published tasks that no queue holds and no result answers.

kombu's Redis transport redelivers the unacked messages of a dead worker after the
visibility timeout (``worker.lease`` keeps a live worker's messages from being
redelivered). What it cannot redeliver is a message that is *nowhere*: lost between
the pop and the unacked record, lost with a Redis that restarted without
persistence, or acked after a failure. The reconciler walks the ledger
(``producers.protocol.ledger``) and, for every task older than ``overdue_s``:

- with a result for every item: done, dropped from the ledger;
- deleted or purged (a tombstone, ``Keys.gone``, for each unit without a result):
  dropped from the ledger with its record, never published again;
- present in a queue list or the unacked hash: looked at again ``overdue_s`` later;
- absent and unanswered on two sweeps in a row: published again from the ledger's
  envelope (same task id), or dead-lettered once its attempts reached the cap.

It runs as ``hetbatch reconcile`` and, by default, inside every worker, where one
leader at a time (a Redis lock with a TTL) does the sweeping.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from hetbatch.producers.errors import PayloadError
from hetbatch.producers.protocol.connect import connect
from hetbatch.producers.protocol.keys import Keys, lane_list
from hetbatch.producers.protocol.kombu import queue_reads, read_task_ids
from hetbatch.producers.protocol.ledger import task_id_of
from hetbatch.producers.protocol.scripts import script
from hetbatch.producers.protocol.wire import TASK_NAME, TaskEnvelope, answerable
from hetbatch.worker.ops.dlq import DeadLetters

__all__ = ["LeaderLock", "Reconciler", "Republisher", "SweepReport", "run"]

log = logging.getLogger(__name__)


class Republisher:
    """Publishes ledger envelopes again, as JSON Celery messages with their original task id."""

    def __init__(self, url: str) -> None:
        from hetbatch.producers.client import make_producer_app

        self.app = make_producer_app(url)

    def publish(self, body: dict[str, Any], queue: str, task_id: str) -> None:
        self.app.send_task(
            TASK_NAME, args=[body], queue=queue, task_id=task_id, retry=True, retry_policy={"max_retries": 3}
        )

    def close(self) -> None:
        self.app.close()

    def __enter__(self) -> Republisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LeaderLock:
    """At most one holder at a time: ``SET NX PX``, renewed only by its owner."""

    def __init__(self, client: redis.Redis, key: str, ttl_s: float) -> None:
        self.redis = client
        self.key = key
        self.ttl_ms = int(ttl_s * 1000)
        self.owner = uuid.uuid4().hex
        self._renew = script(client, "lock_renew")

    def acquire(self) -> bool:
        """Take or keep the lock; False while someone else holds it."""
        if self._renew(keys=[self.key], args=[self.owner, self.ttl_ms]):
            return True
        return bool(self.redis.set(self.key, self.owner, nx=True, px=self.ttl_ms))

    def release(self) -> None:
        self._renew(keys=[self.key], args=[self.owner, 1])


@dataclass
class SweepReport:
    """What one sweep found and did."""

    checked: int = 0
    done: int = 0
    queued: int = 0
    suspect: int = 0
    gone: int = 0
    republished: list[str] = field(default_factory=list)
    dead_lettered: list[str] = field(default_factory=list)


class Reconciler:
    """Re-publishes lost tasks and dead-letters those out of attempts.

    Args:
        client: the Redis holding queues, ledger and results.
        keys: the deployment's key names.
        publish: ``publish(envelope_dict, queue, task_id)``.
        overdue_s: age after which a task's whereabouts are checked.
        max_attempts: starts after which a lost task is dead-lettered instead.
        batch: most ledger entries looked at per sweep.
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        publish: Any,
        *,
        overdue_s: float = 30.0,
        max_attempts: int = 3,
        result_ttl_s: int = 86_400,
        batch: int = 5000,
    ) -> None:
        self.redis = client
        self.keys = keys
        self.publish = publish
        self.overdue_s = overdue_s
        self.max_attempts = max_attempts
        self.batch = batch
        self.dlq = DeadLetters(client, keys, result_ttl_s=result_ttl_s)
        self._missing: set[str] = set()  # absent on the previous sweep

    def sweep(self, now: float | None = None) -> SweepReport:
        """Look at every overdue ledger entry once (see the module docstring)."""
        now = time.time() if now is None else now
        report = SweepReport()
        ids = [
            t.decode()
            for t in cast(
                list[bytes],
                self.redis.zrangebyscore(self.keys.ledger(), "-inf", now - self.overdue_s, start=0, num=self.batch),
            )
        ]
        if not ids:
            self._missing.clear()
            return report
        pipe = self.redis.pipeline(transaction=False)
        for task_id in ids:
            pipe.hmget(self.keys.task(task_id), ["env", "queue", "attempts"])
        entries: dict[str, tuple[TaskEnvelope, dict[str, Any], str, int]] = {}
        gone = []
        for task_id, (env_raw, queue, attempts) in zip(ids, pipe.execute(), strict=True):
            try:
                body = json.loads(env_raw)
                entries[task_id] = (_envelope(body), body, queue.decode(), int(attempts or 0))
            except (TypeError, ValueError, AttributeError, RecursionError, PayloadError):
                gone.append(task_id)  # the ledger record expired or is unreadable: nothing to redo
        report.checked = len(ids)
        unfinished, ended = self._unfinished(entries)
        report.gone = len(ended)
        report.done = len(entries) - len(unfinished) - len(ended)
        drop = gone + [t for t in entries if t not in unfinished]
        present = self._in_broker({entries[t][2] for t in unfinished}) if unfinished else set()
        later: dict[str, float] = {}
        for task_id in unfinished:
            env, body, queue, attempts = entries[task_id]
            if task_id in present:
                report.queued += 1
                later[task_id] = now
            elif task_id not in self._missing:
                report.suspect += 1  # could be between a pop and its unacked record: look again
            elif attempts >= self.max_attempts:
                self.dlq.bury(env, attempts, f"lost after {attempts} attempts (worker deaths)", queue)
                report.dead_lettered.append(task_id)
            else:
                self.publish(body, queue, task_id)
                later[task_id] = now
                report.republished.append(task_id)
        self._missing = {t for t in unfinished if t not in present and t not in later and t not in report.dead_lettered}
        pipe = self.redis.pipeline(transaction=False)
        if drop:
            pipe.zrem(self.keys.ledger(), *drop)
        if ended:  # a record written after the job was deleted: nothing may publish it again
            pipe.delete(*(self.keys.task(t) for t in ended))
        if later:
            pipe.zadd(self.keys.ledger(), later, xx=True)
        if report.republished:
            pipe.hincrby(self.keys.reliability(), "republished", len(report.republished))
        pipe.execute()
        if report.republished or report.dead_lettered:
            log.warning(
                "reconciler: republished %d lost task(s), dead-lettered %d",
                len(report.republished),
                len(report.dead_lettered),
            )
        return report

    def _unfinished(
        self, entries: dict[str, tuple[TaskEnvelope, dict[str, Any], str, int]]
    ) -> tuple[set[str], set[str]]:
        """The tasks with a unit neither answered nor ended, and those whose every
        unanswered unit has a tombstone (deleted or purged)."""
        pipe = self.redis.pipeline(transaction=False)
        order = []
        for task_id, (env, *_rest) in entries.items():
            for item in env.units:
                pipe.exists(self.keys.result(item.job_id, item.chunk))
                pipe.exists(self.keys.gone(item.job_id))
                order.append(task_id)
        replies = pipe.execute()
        missing: set[str] = set()
        tombs: set[str] = set()
        for task_id, answered, ended in zip(order, replies[::2], replies[1::2], strict=True):
            if ended and not answered:
                tombs.add(task_id)
            elif not answered:
                missing.add(task_id)
        return missing - tombs, tombs

    def _held_lists(self) -> list[str]:
        """The lane lists live workers vouch for; those of dead workers are forgotten."""
        index = self.keys.held_index()
        now_ms = time.time() * 1000
        held = {k.decode(): float(v) for k, v in cast(dict[bytes, bytes], self.redis.hgetall(index)).items()}
        stale = [k for k, until in held.items() if until < now_ms]
        if stale:
            self.redis.hdel(index, *stale)
        return sorted(k for k, until in held.items() if until >= now_ms)

    def _in_broker(self, queues: set[str]) -> set[str]:
        """Task ids of every message waiting in ``queues`` or delivered and not yet acked,
        and of every job waiting on those queues' lanes or held by a live worker's lane."""
        lanes = [lane_list(q) for q in sorted(queues)] + self._held_lists()
        pipe = self.redis.pipeline(transaction=False)
        split = queue_reads(pipe, queues)
        for key in lanes:
            pipe.lrange(key, 0, -1)
        results = pipe.execute()
        found = read_task_ids(results[:split])
        found.update(_lane_id(raw) for chunk in results[split:] for raw in chunk)
        return found


def _envelope(body: Any) -> TaskEnvelope:
    """The envelope of a ledger body. A body the worker refuses (a field it does not accept)
    but whose jobs it can name stands for those jobs (``wire.answerable``): published again,
    it is answered with the worker's refusal, never forgotten unanswered.

    Raises:
        PayloadError: the body names no job.
    """
    try:
        return TaskEnvelope.from_dict(body)
    except PayloadError:
        answer = answerable(body)
        if answer is None:
            raise
        return answer


def _lane_id(raw: bytes) -> str:
    """The task id of a lane entry (a bare envelope)."""
    try:
        return task_id_of(TaskEnvelope.from_dict(json.loads(raw)))
    except (ValueError, TypeError, AttributeError, RecursionError, PayloadError):
        return ""


def run(
    redis_url: str,
    keys: Keys,
    *,
    once: bool = False,
    interval_s: float = 10.0,
    overdue_s: float = 30.0,
    max_attempts: int = 3,
    result_ttl_s: int = 86_400,
    on_sweep: Callable[[SweepReport], None] = lambda report: None,
) -> None:
    """Sweep as ``hetbatch reconcile`` does: every ``interval_s`` while leader, or with
    ``once``, twice 2 s apart (a task is acted on only when found missing two sweeps in a
    row) and return. ``on_sweep`` gets each sweep's report.

    Raises:
        redis.RedisError: Redis is unreachable, or refused a command (credentials, ACL).
    """
    client = connect(redis_url)
    client.ping()  # fail fast on a wrong URL or password
    lock = LeaderLock(client, keys.leader(), ttl_s=max(5.0, 3 * interval_s))
    try:
        with Republisher(redis_url) as pub:
            rec = Reconciler(
                client, keys, pub.publish, overdue_s=overdue_s, max_attempts=max_attempts, result_ttl_s=result_ttl_s
            )
            for _ in range(2) if once else iter(int, 1):
                if once or lock.acquire():
                    on_sweep(rec.sweep())
                time.sleep(2.0 if once else interval_s)
    finally:
        client.close()
