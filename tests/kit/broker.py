"""Looking into the broker from a test: the task ids queued for a model, a message lost
on purpose, a ledger record read back, a condition waited for."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from hetbatch.producers import Client
from hetbatch.producers.protocol.kombu import frame_task_id, priority_lists
from hetbatch.producers.protocol.wire import TaskEnvelope


def queue_lists(client: Client, model: str) -> list[str]:
    """The Redis lists (one per priority step) that hold ``model``'s waiting messages."""
    return priority_lists(client.spec(model).queue)


def queued_task_ids(client: Client, model: str) -> list[str]:
    """Celery task ids of the messages waiting for ``model``'s queue."""
    return [frame_task_id(raw) for name in queue_lists(client, model) for raw in client.redis.lrange(name, 0, -1)]


def lose_message(client: Client, model: str, task_id: str) -> int:
    """Delete the message of ``task_id`` from the queue (as between kombu's pop and its
    unacked record); returns how many were removed."""
    removed = 0
    for name in queue_lists(client, model):
        for raw in client.redis.lrange(name, 0, -1):
            if frame_task_id(raw) == task_id:
                removed += int(client.redis.lrem(name, 1, raw))
    return removed


def ledger_envelope(client: Client, task_id: str) -> tuple[TaskEnvelope, dict[str, Any]]:
    """The envelope the producer recorded in the ledger for ``task_id``, and its JSON body."""
    body = json.loads(client.redis.hget(client.keys.task(task_id), "env"))
    return TaskEnvelope.from_dict(body), body


def wait_for(predicate: Callable[[], object], timeout_s: float = 60.0, what: str = "condition") -> None:
    """Poll ``predicate`` every 0.1 s until it is true.

    Raises:
        AssertionError: still false after ``timeout_s`` seconds.
    """
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)
