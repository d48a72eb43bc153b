"""Ending jobs for good: ``delete_job`` (one job) and ``purge_model`` (a model's queued work).

Both take every key the job owns at once, in one MULTI: its record, inputs, results
(and the parts of a result stored in parts, ``producers.protocol.parts``, named by its manifest),
attempts (``Keys.attempts``), ledger records (``Keys.task``) and ledger entries, so the
reconciler has nothing left to publish again. A job that was not answered yet also gets
a tombstone (``Keys.gone``, the word "deleted" or "purged", TTL ``TOMBSTONE_TTL_S``):
a message of it still queued, reserved by a worker, redelivered after a worker death,
held by a lane or republished, is dropped by ``Ledger.begin`` without running, and a
result of a worker that was running it when it was deleted is not stored
(``lua/results_store.lua``). An answered job needs no tombstone: none of its tasks is
in the ledger, so only a delivery still unacked (its worker died between storing and
acking) could run it again. So a stream that deletes each job once read (``Client.map``)
leaves nothing behind. docs/reliability.md draws the whole lifecycle.

Inputs in a shared-memory file of another host are swept there (``shm_ttl_s``), or
deleted by the first worker there that meets the tombstone. Queues are kombu's Redis
lists: one list per priority step, ``<queue>`` for priority 0 and ``<queue>:<n>`` for
the others (``producers.protocol.kombu``), the lane ``<queue>:lane``, and host queues.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import redis

from hetbatch.producers.errors import JobError, PayloadError
from hetbatch.producers.protocol import parts
from hetbatch.producers.protocol.keys import Keys, lane_list
from hetbatch.producers.protocol.kombu import frame_envelope, priority_lists
from hetbatch.producers.protocol.shm import HOST_SEP
from hetbatch.producers.protocol.transport import Transport
from hetbatch.producers.protocol.wire import TaskEnvelope

__all__ = ["DELETED", "PURGED", "TOMBSTONE_TTL_S", "PurgeReport", "delete_job", "job_keys", "purge_model"]

DELETED = "deleted"
PURGED = "purged"
TOMBSTONE_TTL_S = 86_400
"""How long a tombstone lives (s): as long as a job's input and result do by default, so it
outlives every message of the job (a message whose input expired would only store an error)."""

_PAGE = 1000


@dataclass(frozen=True)
class PurgeReport:
    """What ``purge_model`` removed: queue messages, jobs, and keys that existed."""

    messages: int
    jobs: int
    keys: int


def _task_ids(unit: str, chunks: int) -> list[str]:
    # A job's tasks are <job>.<chunk>; a pack's one task is named after its first job, <pack>-0.0.
    # Both are listed: a job id never ends in -<n>, so the other name matches nothing.
    return [f"{unit}.{c}" for c in range(chunks)] + [f"{unit}-0.0"]


def job_keys(keys: Keys, unit: str, chunks: int) -> list[str]:
    """Every key a job (``unit``: its id, or its pack's) can own besides its tombstone:
    record, attempts, and per chunk input, result and ledger record."""
    names = [keys.job(unit), keys.attempts(unit)]
    for chunk in range(chunks):
        names += [keys.input(unit, chunk), keys.result(unit, chunk)]
    return names + [keys.task(t) for t in _task_ids(unit, chunks)]


def _part_names(keys: Keys, unit: str, chunk: int, value: bytes | None) -> list[str]:
    """The part keys a stored result names, if it is a manifest (a corrupt one names none:
    its parts, if any, go with their TTL)."""
    if not parts.is_manifest(value):
        return []
    assert value is not None
    try:
        return parts.part_keys(keys, unit, chunk, len(parts.read_manifest(unit, chunk, value)))
    except JobError:
        return []


def _end(client: redis.Redis, keys: Keys, units: Mapping[str, int], reason: str, ttl_s: int) -> int:
    """Drop every key of ``units`` (unit -> chunks) in one MULTI, and tombstone those not
    answered yet; returns how many keys existed."""
    if not units:
        return 0
    order = sorted(units)
    results = [keys.result(u, c) for u in order for c in range(units[u])]
    stored = cast(list[bytes | None], client.mget(results)) if results else []
    answered, at = set(), 0
    extra: dict[str, list[str]] = {}  # unit -> the parts its manifests name
    for unit in order:
        mine = stored[at : at + units[unit]]
        if all(v is not None for v in mine):
            answered.add(unit)
        extra[unit] = [name for chunk, v in enumerate(mine) for name in _part_names(keys, unit, chunk, v)]
        at += units[unit]
    deleted = 0
    for start in range(0, len(order), _PAGE):
        pipe = client.pipeline(transaction=True)
        for unit in order[start : start + _PAGE]:
            if unit not in answered:
                # First: a worker that begins between the two commands must already see it.
                pipe.set(keys.gone(unit), reason, ex=ttl_s)
            pipe.delete(*job_keys(keys, unit, units[unit]), *extra[unit])
            pipe.zrem(keys.ledger(), *_task_ids(unit, units[unit]))
        replies = pipe.execute()
        i = 0
        for unit in order[start : start + _PAGE]:
            i += unit not in answered
            deleted += int(replies[i])
            i += 2
    return deleted


def delete_job(client: redis.Redis, keys: Keys, job_id: str, chunks: int, *, ttl_s: int = TOMBSTONE_TTL_S) -> int:
    """End a job for good (see the module docstring); returns how many of its keys existed.

    Args:
        client: the Redis holding the job.
        keys: the deployment's key names.
        job_id: the job's unit (its id, or its pack's id).
        chunks: its chunk count.
        ttl_s: how long its tombstone lives (s), when it was not answered yet.

    Raises:
        redis.RedisError: Redis is unreachable or refused a command.
    """
    return _end(client, keys, {job_id: max(1, chunks)}, DELETED, ttl_s)


def _envelope(raw: bytes) -> dict[str, Any] | None:
    """The task envelope inside a kombu message or of a lane entry, or None when it is not ours."""
    try:
        message = json.loads(raw)
    except ValueError:
        return None
    if isinstance(message, dict) and "model" in message:  # a lane entry: the bare envelope
        return cast(dict[str, Any], message)
    return frame_envelope(raw)


def _parse(env: dict[str, Any]) -> TaskEnvelope | None:
    try:
        return TaskEnvelope.from_dict(env)
    except PayloadError:
        return None  # not a task hetbatch can read: its message still goes


def _scan_list(client: redis.Redis, key: str) -> Iterator[bytes]:
    # Paged, so a long queue is never held at once; workers pop from the other end,
    # so pages only shift towards entries already seen (duplicates, never gaps).
    start = 0
    while True:
        page = cast(list[bytes], client.lrange(key, start, start + _PAGE - 1))
        yield from page
        if len(page) < _PAGE:
            return
        start += _PAGE


class _Found:
    """The jobs of one model found so far: unit -> chunks, and their job ids."""

    def __init__(self) -> None:
        self.units: dict[str, int] = {}
        self.jobs: set[str] = set()

    def add(self, env: TaskEnvelope) -> None:
        self.jobs.update(item.job_id for item in env.items)
        for unit in env.units:
            self.units[unit.job_id] = max(self.units.get(unit.job_id, 1), unit.chunk + 1)

    def record(self, unit: str, chunks: int, jobs: Iterable[str]) -> None:
        self.units[unit] = max(self.units.get(unit, 1), chunks)
        self.jobs.update(jobs)


def _queued(client: redis.Redis, name: str, queue: str, found: _Found) -> int:
    """Remove the model's messages from every list of ``queue``; returns how many."""
    removed = 0
    # The queue's host queues too (producers.protocol.shm): ``<queue>@<token>`` and their priority lists.
    hosts = client.scan_iter(match=f"{queue}{HOST_SEP}*", count=_PAGE, _type="list")
    lists = sorted({k.decode() if isinstance(k, bytes) else str(k) for k in hosts})
    for key in [*priority_lists(queue), lane_list(queue), *lists]:
        matches = []
        for raw in _scan_list(client, key):
            env = _envelope(raw)
            if env is not None and env.get("model") == name:
                matches.append(raw)
                parsed = _parse(env)
                if parsed is not None:
                    found.add(parsed)
        for raw in dict.fromkeys(matches):
            removed += int(client.lrem(key, 1, raw))  # type: ignore[arg-type]  # bytes are fine
    return removed


def _in_ledger(client: redis.Redis, keys: Keys, name: str, found: _Found) -> None:
    """The model's tasks the ledger still watches: reserved by a worker, held by a lane,
    or lost and waiting to be published again."""
    start = 0
    while True:
        ids = cast(list[bytes], client.zrange(keys.ledger(), start, start + _PAGE - 1))
        pipe = client.pipeline(transaction=False)
        for task_id in ids:
            pipe.hget(keys.task(task_id.decode()), "env")
        for raw in pipe.execute():
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                continue
            if isinstance(body, dict) and body.get("model") == name and (env := _parse(body)) is not None:
                found.add(env)
        if len(ids) < _PAGE:
            return
        start += _PAGE


def _recorded(client: redis.Redis, keys: Keys, name: str, found: _Found) -> None:
    """The model's jobs with a record (queued, running or answered)."""
    prefix = f"{name}@"
    for record in client.scan_iter(match=keys.job("*"), count=_PAGE):
        raw_meta = cast(bytes | None, client.get(record))
        meta = json.loads(raw_meta) if raw_meta else {}
        if isinstance(meta, dict) and str(meta.get("model", "")).startswith(prefix):
            unit = (record.decode() if isinstance(record, bytes) else str(record)).rsplit(":", 1)[1]
            sizes = meta.get("pack") or []
            jobs = [f"{unit}-{n}" for n in range(len(sizes))] if sizes else [unit]
            found.record(unit, int(meta.get("chunks") or 1), jobs)


def purge_model(
    client: redis.Redis, keys: Keys, name: str, queue: str, shm_dir: str = "", *, ttl_s: int = TOMBSTONE_TTL_S
) -> PurgeReport:
    """End every job of model ``name`` (any version) for good: its queued messages on
    ``queue`` (every priority, the lane, host queues) and every key of it in Redis go,
    and a job a worker holds now or later never runs (module docstring).

    Args:
        client: the Redis holding queues and jobs.
        keys: the deployment's key names.
        name: the model's name.
        queue: the model's queue.
        shm_dir: this host's shared-memory folder (its files of the jobs are deleted).
        ttl_s: how long the tombstones live (s).

    Raises:
        redis.RedisError: Redis is unreachable or refused a command.
    """
    found = _Found()
    messages = _queued(client, name, queue, found)
    _in_ledger(client, keys, name, found)
    _recorded(client, keys, name, found)
    deleted = _end(client, keys, found.units, PURGED, ttl_s)
    # Their input files in this host's folder; another host's are deleted there (module docstring).
    transport = Transport(keys, shm_dir)
    transport.drop(client, [], transport.inputs((u, c) for u, n in found.units.items() for c in range(n))[1])
    return PurgeReport(messages=messages, jobs=len(found.jobs), keys=deleted)
