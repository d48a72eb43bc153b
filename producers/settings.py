"""Client settings: the only place the producer side reads environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

from hetbatch.producers.errors import ConfigError
from hetbatch.producers.protocol.keys import DEFAULT_PREFIX

__all__ = ["DEFAULT_REDIS_URL", "ClientSettings", "env_overrides"]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def env_overrides(cls: Any, prefix: str = "HETBATCH_") -> dict[str, Any]:
    """Values for the dataclass ``cls`` taken from ``HETBATCH_<FIELD>`` variables.

    Raises:
        ConfigError: a variable that is not a number where the field is one.
    """
    out: dict[str, Any] = {}
    for f in fields(cls):
        raw = os.environ.get(prefix + f.name.upper())
        if raw is None:
            continue
        default: Any = f.default
        kind: Any = type(default) if default is not None else str
        if kind is bool:
            out[f.name] = raw.lower() in ("1", "true", "yes", "on")
        elif kind in (int, float):
            try:
                out[f.name] = kind(raw)
            except ValueError:
                what = "an integer" if kind is int else "a number"
                raise ConfigError(f"{prefix}{f.name.upper()}={raw!r} is not {what}; fix or unset it") from None
        else:
            out[f.name] = raw
    return out


@dataclass(frozen=True)
class ClientSettings:
    """How a producer talks to Redis and shapes its jobs (env prefix ``HETBATCH_``)."""

    redis_url: str = DEFAULT_REDIS_URL
    """Broker and result store; ``rediss://`` and ``user:password@`` work."""
    prefix: str = DEFAULT_PREFIX
    """Prefix of every hetbatch key in Redis."""
    chunk_rows: int = 65_536
    """Rows per task for large jobs: big enough to amortize the ~1 ms task cost."""
    chunk_bytes: int = 32 * 1024 * 1024
    """Bytes per task for large jobs (``producers.chunking``): a task stops at ``chunk_rows``
    rows or at this many bytes of input (or of expected output, when larger), whichever
    comes first. 32 MiB keeps the per-task cost under 1 % (encoding it takes ~30 ms) while a
    worker holding a task per thread stays within a few GiB; 1,000 images of 3x224x224
    float32 go as 19 tasks, not one 602 MB payload over ``max_payload_bytes``."""
    inline_max_bytes: int = 8_192
    """Payloads up to this size ride inside the task message; larger ones by reference
    (``python -m bench.threshold``: inline wins below ~4 KiB, by reference from ~16 KiB)."""
    max_payload_bytes: int = 256 * 1024 * 1024
    """Largest encoded chunk the client sends (the worker checks again)."""
    input_ttl_s: int = 86_400
    """How long a payload waits in Redis for a worker."""
    result_ttl_s: int = 86_400
    """How long results are kept (set by the worker from the envelope)."""
    registry_ttl_s: float = 2.0
    """How long a resolved ``name`` -> version is cached on the client."""
    publish_retries: int = 5
    """Attempts to publish a task before raising BrokerError."""
    wait_replicas: int = 0
    """Replicas that must hold a submit before it returns (Redis ``WAIT`` after its
    transaction): with 1 and a Sentinel replica, an accepted job survives the loss of the
    master. 0 returns once the master has it (replication is asynchronous)."""
    wait_timeout_ms: int = 5_000
    """How long a submit waits for ``wait_replicas`` before raising BrokerError."""
    lane_max_rows: int = 0
    """Single-chunk, normal-priority jobs of up to this many rows go on the queue's lane
    (``producers.protocol.kombu.lane_list``) instead of one Celery message each: workers take
    them many at a time, at a fraction of the per-message cost, while a worker that
    drains that lane is alive (its heartbeat says so). 0 turns the lane off.
    Flower shows lane batches (``hetbatch.lane``), not each job."""

    async_max_connections: int = 64
    """Most Redis connections an ``AsyncClient`` opens; more concurrent awaits wait for a
    free one (up to ``pool_timeout_s``) instead of failing."""
    pool_timeout_s: float = 60.0
    """Seconds an ``AsyncClient`` call waits for a free connection before a retry."""

    shm_dir: str = "/dev/shm"
    """Shared-memory folder: a job of at least ``shm_min_bytes`` goes through a file there
    (``producers.protocol.shm``) while a worker sharing the folder consumes the model's queue; it
    skips two copies through Redis and two through sockets. "" turns it off."""
    shm_min_bytes: int = 1 << 20
    """Smallest job (bytes of its input rows in memory) sent through shared memory."""

    tracing: bool = False
    """Record a ``hetbatch.submit`` span per submit and send its context with the job
    (OpenTelemetry, ``producers.protocol.tracing``; needs the ``otel`` extra). Off: no cost."""

    @classmethod
    def from_env(cls, **overrides: Any) -> ClientSettings:
        values = env_overrides(cls)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
