"""Worker pools: the environment a pool needs, one process per GPU, and liveness beats.

CUDA reads ``CUDA_VISIBLE_DEVICES`` once, when a framework first touches the driver,
and a CUDA context does not survive ``fork``: so each GPU gets its own freshly
exec'd worker process with the variable set before any framework is imported, and a
cpu pool hides every GPU. Each worker refreshes ``Keys.alive(queue)`` for the queues it
consumes; the client reads them to send a gpu model with ``fallback = "cpu"`` to the
cpu queue while no gpu worker is up.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from types import FrameType

import redis

from producers.wire import Keys
from worker.settings import WorkerSettings

__all__ = ["Heartbeat", "pool_env", "spawn_gpu_workers"]

log = logging.getLogger(__name__)

# Deletes the beat only if it is still ours: another worker of the queue may own it now.
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


def pool_env(pool: str, gpu: str | None = None) -> dict[str, str]:
    """Variables to set before any framework import: none of the GPUs for ``cpu``, one for ``gpu``."""
    if pool == "cpu":
        return {"CUDA_VISIBLE_DEVICES": ""}
    return {"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}


def spawn_gpu_workers(gpus: Sequence[str], worker_args: Sequence[str]) -> int:
    """Run ``hetbatch worker --pool gpu --gpus N`` once per GPU and wait for them all.

    SIGTERM and SIGINT to this process are passed on as SIGTERM (Celery's warm
    shutdown). The children run in their own sessions, so a Ctrl-C reaches each once.

    Returns:
        The highest exit status of the children.
    """
    procs: list[subprocess.Popen[bytes]] = []
    for gpu in gpus:
        argv = [sys.executable, "-m", "worker.cli", "worker", "--pool", "gpu", "--gpus", gpu, *worker_args]
        env = dict(os.environ, **pool_env("gpu", gpu))
        procs.append(subprocess.Popen(argv, env=env, start_new_session=True))
        print(f"hetbatch: started gpu worker pid {procs[-1].pid} with CUDA_VISIBLE_DEVICES={gpu}", file=sys.stderr)

    def forward(signum: int, frame: FrameType | None) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        codes = []
        for gpu, proc in zip(gpus, procs, strict=True):
            codes.append(proc.wait())
            if codes[-1]:
                print(f"hetbatch: gpu worker {gpu} exited with status {codes[-1]}", file=sys.stderr)
        return max(codes)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Heartbeat:
    """Refreshes ``Keys.alive(queue)`` (TTL ``heartbeat_ttl_s``) for each consumed queue.

    Args:
        settings: the worker's settings (Redis URL, prefix, queues, TTL).
        name: this worker's name, stored as the value so a clean stop removes only its own beat.
    """

    def __init__(self, settings: WorkerSettings, name: str | None = None) -> None:
        self.keys = [Keys(settings.prefix).alive(q) for q in settings.queue_names]
        self.ttl_s = max(1.0, settings.heartbeat_ttl_s)
        self.name = name or f"{settings.pool}-{os.getpid()}@{socket.gethostname()}"
        self._redis = redis.Redis.from_url(settings.redis_url, socket_timeout=self.ttl_s / 3)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hetbatch-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def beat(self) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for key in self.keys:
            pipe.set(key, self.name, px=int(self.ttl_s * 1000))
        pipe.execute()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
            except redis.RedisError as exc:  # Celery reconnects on its own; the beat just retries
                log.warning("heartbeat to Redis failed: %s", exc)
            self._stop.wait(self.ttl_s / 3)

    def stop(self) -> None:
        """Stop beating and remove the beats this worker still owns."""
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            for key in self.keys:
                self._redis.eval(_RELEASE, 1, key, self.name)
        except redis.RedisError as exc:
            log.warning("could not remove heartbeat keys (they expire in %.0f s): %s", self.ttl_s, exc)
        self._redis.close()
