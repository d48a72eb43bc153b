"""Dropping what a job left in Redis, and queued work of a model, before its TTL does.

Inputs live ``ClientSettings.input_ttl_s`` (the worker deletes each as soon as its task
ran), results and job records ``result_ttl_s``. ``delete_job`` and ``purge_model`` free
them early. Queues are kombu's Redis lists: one list per priority step, ``<queue>`` for
priority 0 and ``<queue>:<n>`` for the others (``producers.protocol.kombu``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import redis

from hetbatch.producers.errors import PayloadError
from hetbatch.producers.protocol.keys import Keys, lane_list
from hetbatch.producers.protocol.kombu import frame_envelope, priority_lists
from hetbatch.producers.protocol.shm import HOST_SEP
from hetbatch.producers.protocol.transport import Transport
from hetbatch.producers.protocol.wire import TaskEnvelope

__all__ = ["PurgeReport", "delete_job", "purge_model"]

_PAGE = 1000


@dataclass(frozen=True)
class PurgeReport:
    """What ``purge_model`` removed."""

    messages: int
    jobs: int
    keys: int


def delete_job(client: redis.Redis, keys: Keys, job_id: str, chunks: int) -> int:
    """Delete a job's record, inputs and results; returns how many keys existed.

    A chunk still queued runs anyway: its input is gone, so it stores a JobLost
    error that expires with the result TTL. Use ``purge_model`` to drop queued work.
    """
    names = [keys.job(job_id)]
    for chunk in range(chunks):
        names += [keys.input(job_id, chunk), keys.result(job_id, chunk)]
    return int(client.delete(*names))


def _envelope(raw: bytes) -> dict[str, Any] | None:
    """The task envelope inside a kombu message or of a lane entry, or None when it is not ours."""
    try:
        message = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if isinstance(message, dict) and "model" in message:  # a lane entry: the bare envelope
        return cast(dict[str, Any], message)
    return frame_envelope(raw)


def _job_ids(env: dict[str, Any]) -> list[str]:
    try:
        return [item.job_id for item in TaskEnvelope.from_dict(env).items]
    except PayloadError:
        return []  # not a task hetbatch can read: its message still goes


def _inputs(transport: Transport, env: dict[str, Any]) -> tuple[list[str], list[str]]:
    try:
        parsed = TaskEnvelope.from_dict(env)
    except PayloadError:
        return [], []
    unit = parsed.units[0]
    return transport.allowed_keys(parsed), transport.inputs([(unit.job_id, unit.chunk)])[1]


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


def purge_model(client: redis.Redis, keys: Keys, name: str, queue: str, shm_dir: str = "") -> PurgeReport:
    """Drop the queued tasks of model ``name`` (any version) from ``queue``, then the
    inputs, results and records of every job of that model still in Redis.

    Tasks already reserved by a worker are not touched; they finish normally.
    """
    removed_messages = 0
    job_ids: set[str] = set()
    doomed: set[str] = set()
    files: list[str] = []
    transport = Transport(keys, shm_dir)
    # The queue's host queues too (producers.protocol.shm): ``<queue>@<token>`` and their priority lists.
    found = client.scan_iter(match=f"{queue}{HOST_SEP}*", count=_PAGE, _type="list")
    hosts = sorted({k.decode() if isinstance(k, bytes) else str(k) for k in found})
    for key in [*priority_lists(queue), lane_list(queue), *hosts]:
        matches = []
        for raw in _scan_list(client, key):
            env = _envelope(raw)
            if env is not None and env.get("model") == name:
                matches.append(raw)
                job_ids.update(_job_ids(env))
                if env.get("pack"):  # a pack's jobs share one record and one result
                    doomed.update((keys.job(str(env["pack"])), keys.result(str(env["pack"]), 0)))
                # Its input by the names derived from its job id, never the names it gives.
                refs, names = _inputs(transport, env)
                doomed.update(refs)
                files += names
        for raw in dict.fromkeys(matches):
            removed_messages += int(client.lrem(key, 1, raw))  # type: ignore[arg-type]  # bytes are fine
    prefix = f"{name}@"
    for record in client.scan_iter(match=keys.job("*"), count=_PAGE):
        raw_meta = cast(bytes | None, client.get(record))
        meta = json.loads(raw_meta) if raw_meta else {}
        if str(meta.get("model", "")).startswith(prefix):
            job_id = (record.decode() if isinstance(record, bytes) else str(record)).rsplit(":", 1)[1]
            job_ids.add(job_id)
            chunks = int(meta.get("chunks") or 1)
            doomed.update(keys.result(job_id, c) for c in range(chunks))
            doomed.update(keys.input(job_id, c) for c in range(chunks))
    for job_id in job_ids:
        doomed.update((keys.job(job_id), keys.result(job_id, 0), keys.input(job_id, 0)))
    deleted = 0
    names = sorted(doomed)
    for start in range(0, len(names), _PAGE):
        deleted += int(client.delete(*names[start : start + _PAGE]))
    # Files of another host's folder are swept there once their TTL passes.
    transport.drop(client, [], files)
    return PurgeReport(messages=removed_messages, jobs=len(job_ids), keys=deleted)
