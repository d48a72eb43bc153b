"""The true backlog of each queue: the work waiting and the work workers hold unfinished.

An autoscaler that reads one list length sees too little: a Celery worker prefetches
``concurrency x prefetch_multiplier`` messages (kombu moves them off the list into its
``unacked`` hash), and a lane batch sits in a worker's *held* list while it runs. Here
each queue's backlog is the sum of three states:

- ``waiting``: every priority list of the queue and its lane list (``queue_depths``);
- ``reserved``: delivered, unacknowledged Celery messages, prefetched or running (and a
  dead worker's, until kombu restores them to the list): counted inside Redis by
  ``unacked_counts``;
- ``held``: lane jobs a worker took and has not answered (the lane's held lists).

A host queue (``<queue>@<host token>``, ``producers.protocol.shm``) counts towards its
queue: the same pool serves both. ``hetbatch backlog`` prints this report and every
worker's metrics endpoint exports it as ``hetbatch_backlog{queue,state}``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, cast

import redis

from hetbatch.producers.errors import HetbatchError
from hetbatch.producers.protocol.keys import Keys
from hetbatch.producers.protocol.kombu import queue_depths, unacked_counts
from hetbatch.producers.protocol.registry import Registry, as_model
from hetbatch.producers.protocol.shm import HOST_SEP
from hetbatch.producers.protocol.wire import DEVICES, FRAMEWORKS, FUSION_QUEUE, queue_for

__all__ = [
    "STATES",
    "UNKNOWN_QUEUE",
    "QueueBacklog",
    "base_queue",
    "known_queues",
    "measure",
    "metric_families",
    "render",
    "serve",
    "to_dict",
]

log = logging.getLogger(__name__)

STATES = ("waiting", "reserved", "held")
UNKNOWN_QUEUE = "?"
"""Where held lane jobs of a model no longer in the registry are counted."""

# name@version -> queue; a registered version never changes (producers.protocol.registry).
_QUEUE_OF: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class QueueBacklog:
    """One queue's backlog in jobs (Celery messages and lane entries; a pack counts once)."""

    waiting: int = 0
    reserved: int = 0
    held: int = 0

    @property
    def total(self) -> int:
        """Work not yet finished: what an autoscaler should size the pool by."""
        return self.waiting + self.reserved + self.held

    def __add__(self, other: QueueBacklog) -> QueueBacklog:
        return QueueBacklog(self.waiting + other.waiting, self.reserved + other.reserved, self.held + other.held)


def base_queue(name: str) -> str:
    """The queue a host queue belongs to (``onnx.cpu@token`` -> ``onnx.cpu``)."""
    return name.split(HOST_SEP, 1)[0]


def known_queues(client: redis.Redis, keys: Keys) -> list[str]:
    """Every queue of the fixed layout, then those live workers' heartbeats name (custom
    queues, host queues)."""
    queues = [queue_for(f, d) for d in DEVICES for f in FRAMEWORKS] + [FUSION_QUEUE]
    seen: set[str] = set()
    for key in client.scan_iter(match=keys.worker("*"), count=500):
        raw = cast(bytes | None, client.get(key))
        try:
            seen.update(str(q) for q in json.loads(raw or b"{}").get("queues", []))
        except (ValueError, AttributeError):
            continue  # a heartbeat being rewritten, or not ours: the next call sees it
    return queues + sorted(seen - set(queues))


def _held_counts(client: redis.Redis, keys: Keys) -> dict[str, int]:
    """Lane jobs in held lists, by queue. A held list holds one batch, popped from one lane
    (BLMPOP takes from a single list), so its first envelope's model names the queue."""
    names = [k.decode() if isinstance(k, bytes) else str(k) for k in client.hkeys(keys.held_index())]
    if not names:
        return {}
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.llen(name)
        pipe.lindex(name, 0)
    replies = pipe.execute()
    counts: dict[str, int] = {}
    registry = Registry(client, keys)
    for length, first in zip(replies[::2], replies[1::2], strict=True):
        if not length or first is None:
            continue  # released or expired: the index entry is swept by the reconciler
        queue = _queue_of(registry, keys, first)
        counts[queue] = counts.get(queue, 0) + int(length)
    return counts


def _queue_of(registry: Registry, keys: Keys, raw: bytes) -> str:
    try:
        env = json.loads(raw)
        ref = (keys.prefix, f"{env['model']}@{env['version']}")
    except (ValueError, KeyError, TypeError):
        return UNKNOWN_QUEUE
    if ref not in _QUEUE_OF:
        try:
            _QUEUE_OF[ref] = as_model(registry.get(ref[1])).queue
        except HetbatchError:
            return UNKNOWN_QUEUE  # deleted from the registry: not cached, it may come back
    return _QUEUE_OF[ref]


def measure(client: redis.Redis, keys: Keys, queues: Iterable[str]) -> dict[str, QueueBacklog]:
    """The backlog of each of ``queues`` (host queues folded into their queue), and of any
    other queue with reserved or held work. Three round trips, plus one per registry
    lookup of a model not seen before.

    Raises:
        redis.RedisError: Redis is unreachable or refused a command (EVALSHA, HVALS).
    """
    names = list(dict.fromkeys(queues))
    out: dict[str, QueueBacklog] = {base_queue(q): QueueBacklog() for q in names}
    for queue, steps in queue_depths(client, names).items():
        out[base_queue(queue)] += QueueBacklog(waiting=sum(steps.values()))
    for queue, n in unacked_counts(client).items():
        out[base_queue(queue)] = out.get(base_queue(queue), QueueBacklog()) + QueueBacklog(reserved=n)
    for queue, n in _held_counts(client, keys).items():
        out[queue] = out.get(queue, QueueBacklog()) + QueueBacklog(held=n)
    return out


def to_dict(found: dict[str, QueueBacklog]) -> dict[str, dict[str, Any]]:
    """JSON-ready: queue -> its states and total."""
    return {q: {**asdict(b), "total": b.total} for q, b in found.items()}


def render(found: dict[str, QueueBacklog]) -> str:
    """One row per queue, busiest first."""
    head = ("QUEUE", "TOTAL", "WAITING", "RESERVED", "HELD")
    rows = [(q, str(b.total), str(b.waiting), str(b.reserved), str(b.held))
            for q, b in sorted(found.items(), key=lambda kv: (-kv[1].total, kv[0]))]  # fmt: skip
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in [head, *rows])


def metric_families(client: redis.Redis, keys: Keys, queues: Iterable[str]) -> list[Any]:
    """``hetbatch_backlog{queue,state}`` and ``hetbatch_dead_letters`` as Prometheus gauges,
    read now (a collector calls this at scrape time). Every exporter of a queue reports the
    same Redis-wide value: aggregate with ``max``, never ``sum``. A Redis error leaves the
    gauges empty (logged), so the scrape itself still succeeds.
    """
    from prometheus_client.core import GaugeMetricFamily

    backlog = GaugeMetricFamily(
        "hetbatch_backlog",
        "Jobs of a queue not finished: waiting, reserved (prefetched or running Celery tasks), held (lane)",
        labels=["queue", "state"],
    )
    dead = GaugeMetricFamily("hetbatch_dead_letters", "Dead-lettered tasks waiting for an operator (hetbatch dlq)")
    try:
        for queue, found in measure(client, keys, queues).items():
            for state in STATES:
                backlog.add_metric([queue, state], getattr(found, state))
        dead.add_metric([], int(client.llen(keys.dlq())))
    except redis.RedisError as exc:
        log.warning("backlog not read: %s", exc)
    return [backlog, dead]


class _Exporter:
    """Collector of ``serve``: every known queue, looked up at each scrape."""

    def __init__(self, client: redis.Redis, keys: Keys, queues: list[str]) -> None:
        self._client, self._keys, self._queues = client, keys, queues

    def collect(self) -> Iterator[Any]:
        try:
            queues = self._queues or known_queues(self._client, self._keys)
        except redis.RedisError as exc:
            log.warning("queues not listed: %s", exc)
            queues = []
        yield from metric_families(self._client, self._keys, queues)


def serve(client: redis.Redis, keys: Keys, *, port: int, address: str = "0.0.0.0", queues: Iterable[str] = ()) -> None:
    """Serve ``/metrics`` with the backlog of ``queues`` (default: every known queue) on
    ``address:port`` until the process is stopped.

    Raises:
        ConfigError: prometheus_client is not installed.
        OSError: the port cannot be bound.
    """
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError as exc:
        from hetbatch.producers.errors import ConfigError

        raise ConfigError("the backlog exporter needs prometheus_client: pip install 'hetbatch[metrics]'") from exc
    registry = CollectorRegistry()
    registry.register(_Exporter(client, keys, list(queues)))
    start_http_server(port, addr=address, registry=registry)
    log.info("backlog metrics on http://%s:%d/metrics", address, port)
    while True:  # the server runs in a daemon thread; SIGTERM ends the process
        time.sleep(3600)
