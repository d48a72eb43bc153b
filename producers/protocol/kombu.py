"""Celery task messages written straight into kombu's Redis lists.

``send_task`` costs a round trip per message plus ~0.3 ms of Python; writing the
same Celery protocol-2 message with LPUSH lets a job's payload, its ledger record and
its task message share one pipelined round trip. The frame below is the one kombu's
Redis transport stores (checked by a test against ``send_task``'s own output), and
workers consume it through the ordinary Celery consumer.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from typing import Any

__all__ = [
    "LANE_PRIORITY",
    "PRIORITY_SEP",
    "PRIORITY_STEPS",
    "TRANSPORT_OPTIONS",
    "celery_message",
    "lane_list",
    "priority_list",
]

PRIORITY_SEP = ":"
PRIORITY_STEPS = list(range(10))
# Shared by both Celery apps: priorities are separate Redis lists, 0 served first.
TRANSPORT_OPTIONS: dict[str, Any] = {
    "priority_steps": PRIORITY_STEPS,
    "sep": PRIORITY_SEP,
    "queue_order_strategy": "priority",
}
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_ORIGIN = f"{os.getpid()}@{socket.gethostname()}"


def priority_list(queue: str, priority: int) -> str:
    """The Redis list kombu reads for ``queue`` at ``priority`` (0 is the bare name)."""
    return f"{queue}{PRIORITY_SEP}{priority}" if priority else queue


# The lane carries normal-priority jobs only: high and low ones keep Celery's priority lists.
LANE_PRIORITY = 5


def lane_list(queue: str) -> str:
    """The Redis list of ``queue``'s lane: bare task envelopes (JSON), no Celery frame.

    Workers drain it many envelopes at a time (``worker.lane``), which spares small jobs
    Celery's per-message cost; the ledger covers its jobs as it covers Celery's.
    """
    return f"{queue}{PRIORITY_SEP}lane"


def celery_message(
    task: str, args: list[Any], queue: str, priority: int, argsrepr: str, task_id: str | None = None
) -> bytes:
    """A JSON Celery protocol-2 message for kombu's Redis transport."""
    task_id = task_id or str(uuid.uuid4())
    body = base64.b64encode(json.dumps([args, {}, _EMBED]).encode()).decode()
    message = {
        "body": body,
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": task,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": argsrepr,
            "kwargsrepr": "{}",
            "origin": _ORIGIN,
            "ignore_result": True,
        },
        "properties": {
            "correlation_id": task_id,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": priority,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return json.dumps(message).encode()
