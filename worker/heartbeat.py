"""A worker's heartbeat: its status record and its queues' liveness keys, kept fresh in Redis.

Each worker writes a small JSON record (pool, queues, threads, loaded models, metrics
port) under ``Keys.worker(<node name>)`` every ``heartbeat_interval_s``, with a TTL of
three intervals, so a dead worker drops out by itself; ``hetbatch status``
(``worker.ops.status``) reads them. The same thread refreshes ``Keys.alive`` of each
queue the worker consumes (the client's gpu fallback routing reads it) and, while it
drains lanes, of each queue's lane (a producer uses a lane only while one is fresh),
and now and then deletes shared-memory payloads that nobody claimed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from hetbatch.producers.protocol import shm
from hetbatch.producers.protocol.keys import Keys, lane_list
from hetbatch.producers.protocol.scripts import script
from hetbatch.worker.settings import WorkerSettings

__all__ = ["Heartbeat"]

log = logging.getLogger(__name__)

_SWEEP_EVERY_S = 300.0  # old shared-memory payloads are looked for this often


class Heartbeat:
    """The heartbeat thread of one worker process (see the module docstring).

    Args:
        client: the worker's Redis.
        keys: the deployment's key names.
        name: the worker's Celery node name.
        settings: the worker's settings (queues, pool, interval, shared-memory folder).
        loaded: loaded models, ``name@version`` -> queue, read at every beat.
        metrics_port: the port its Prometheus endpoint serves (0: none).
        lanes: whether the worker drains its queues' lanes.
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        name: str,
        settings: WorkerSettings,
        loaded: Callable[[], dict[str, str]],
        metrics_port: int = 0,
        lanes: bool = False,
    ) -> None:
        self._client = client
        self._key = keys.worker(name)
        self._alive = [keys.alive(q) for q in settings.queue_names]
        if lanes:
            self._alive += [keys.alive(lane_list(q)) for q in settings.queue_names]
        self._name = name
        self._settings = settings
        self._loaded = loaded
        self._metrics_port = metrics_port
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hetbatch-heartbeat", daemon=True)

    def record(self) -> dict[str, Any]:
        """The status record ``hetbatch status`` shows (``seen`` in unix seconds)."""
        return {
            "name": self._name,
            "pool": self._settings.pool,
            "queues": self._settings.queue_names,
            "concurrency": self._settings.concurrency,
            "models": dict(sorted(self._loaded().items())),
            "metrics_port": self._metrics_port,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "seen": time.time(),
        }

    def beat(self) -> None:
        """Write the record and refresh the liveness keys (TTL: three intervals, at least 1 s).

        Raises:
            redis.RedisError: Redis is unreachable or refused the writes.
        """
        ttl_ms = max(1000, int(self._settings.heartbeat_interval_s * 3000))
        pipe = self._client.pipeline(transaction=False)
        pipe.set(self._key, json.dumps(self.record()), px=ttl_ms)
        for key in self._alive:
            pipe.set(key, self._name, px=ttl_ms)
        pipe.execute()

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating and remove the record (the liveness keys only while still ours)."""
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(redis.RedisError):  # the TTLs remove them anyway
            self._client.delete(self._key)
            release = script(self._client, "delete_if_owner")
            for key in self._alive:  # another worker of the same queue may own it now
                release(keys=[key], args=[self._name])

    def _loop(self) -> None:
        swept = 0.0
        while not self._stop.is_set():
            try:
                self.beat()
            except redis.RedisError as exc:
                # Redis down: the worker itself reconnects; the record just ages out.
                log.warning("heartbeat not written: %s", exc)
            if time.monotonic() - swept > _SWEEP_EVERY_S and self._settings.shm_dir:
                swept = time.monotonic()
                if removed := shm.sweep(self._settings.shm_dir, self._settings.shm_ttl_s):
                    log.info("deleted %d shared-memory payloads older than %d s", removed, self._settings.shm_ttl_s)
            self._stop.wait(self._settings.heartbeat_interval_s)
