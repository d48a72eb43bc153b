"""Routing: which list a job's tasks go to (its queue, the queue's lane, a host queue).

Workers keep ``Keys.alive(queue)`` fresh while they consume ``queue`` (and
``alive(lane_list(queue))`` while they drain its lane, ``alive(host queue)`` while they
share this host's shared-memory folder). The router reads those keys, cached for
``ttl_s`` like model specs, and sends a job where a live worker will take it.
"""

from __future__ import annotations

import time

import redis

from hetbatch.producers.protocol import shm
from hetbatch.producers.protocol.keys import Keys, lane_list
from hetbatch.producers.protocol.registry import ModelSpec
from hetbatch.producers.protocol.wire import queue_for

__all__ = ["Router"]


class Router:
    """Chooses queues from the workers' liveness keys.

    Args:
        client: the Redis holding the queues.
        keys: the deployment's key names.
        shm_dir: this client's shared-memory folder ("" for none).
        ttl_s: seconds a liveness answer is reused.
    """

    def __init__(self, client: redis.Redis, keys: Keys, *, shm_dir: str, ttl_s: float) -> None:
        self._client = client
        self._keys = keys
        self._shm_dir = shm_dir
        self._ttl_s = ttl_s
        self._consumed: dict[str, tuple[float, bool]] = {}  # queue or lane -> (checked at, a worker takes it)

    def queue(self, spec: ModelSpec) -> str:
        """The model's queue; a gpu model with ``fallback = "cpu"`` goes to the cpu queue while no
        gpu worker of its queue is alive (a job never moves to a cpu silently otherwise)."""
        if spec.device == "gpu" and spec.fallback == "cpu" and not self._client.exists(self._keys.alive(spec.queue)):
            return queue_for(spec.framework, "cpu")
        return spec.queue

    def lane_drained(self, queue: str) -> bool:
        """Whether a live worker drains ``queue``'s lane. Without one, a job takes Celery:
        a lane nobody drains (prefork-only or older workers) would keep it waiting."""
        return self.alive(lane_list(queue))

    def host_queue(self, queue: str) -> str | None:
        """``queue``'s host queue while a live worker consumes it, that is one that shares
        this client's shared-memory folder (``producers.protocol.shm``)."""
        token = shm.host_token(self._shm_dir)
        if token is None:
            return None
        host = shm.host_queue(queue, token)
        return host if self.alive(host) else None

    def alive(self, queue: str) -> bool:
        """Whether a live worker consumes ``queue`` (its heartbeat keeps a key fresh); cached."""
        now = time.monotonic()
        hit = self._consumed.get(queue)
        if hit is None or now - hit[0] >= self._ttl_s:
            hit = (now, bool(self._client.exists(self._keys.alive(queue))))
            self._consumed[queue] = hit
        return hit[1]
