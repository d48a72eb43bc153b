"""Who works on what: worker heartbeats in Redis, queue depths, and ``hetbatch status``.

Each worker writes a small JSON heartbeat (pool, queues, threads, loaded models,
metrics port) under ``<prefix>:worker:<node name>`` every ``heartbeat_interval_s``,
with a TTL of three intervals, so a dead worker drops out by itself. ``hetbatch
status`` reads those, pings the workers through Celery's control channel, and counts
the messages waiting in every queue (all priority lists of it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import redis
from celery.signals import worker_ready, worker_shutdown

from hetbatch.producers.protocol import shm
from hetbatch.producers.protocol.kombu import LANE_PRIORITY, PRIORITY_STEPS, lane_list
from hetbatch.producers.protocol.retention import waiting_lists
from hetbatch.producers.protocol.wire import DEVICES, FRAMEWORKS, Keys, queue_for
from hetbatch.worker.lane import drains_lane
from hetbatch.worker.settings import WorkerSettings

__all__ = ["Heartbeat", "StatusReport", "WorkerInfo", "add_parser", "collect", "queue_depths", "render"]

log = logging.getLogger(__name__)

_SWEEP_EVERY_S = 300.0  # old shared-memory payloads are looked for this often


def _heartbeat_key(keys: Keys, name: str) -> str:
    return f"{keys.prefix}:worker:{name}"


def queue_depths(client: redis.Redis, queues: Iterable[str]) -> dict[str, dict[int, int]]:
    """Waiting messages per queue and priority step (one LLEN per kombu list)."""
    names = list(queues)
    pipe = client.pipeline(transaction=False)
    for queue in names:
        for key in waiting_lists(queue):  # the priority lists, then the lane
            pipe.llen(key)
    counts = iter(cast(list[int], pipe.execute()))
    depths = {}
    for queue in names:
        depths[queue] = {step: int(next(counts)) for step in PRIORITY_STEPS}
        depths[queue][LANE_PRIORITY] += int(next(counts))  # lane jobs are normal-priority jobs
    return depths


# Delete a liveness key only while it still holds this worker's name.
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


class Heartbeat:
    """A thread that keeps this worker's status record, and the liveness key of each queue
    it consumes (``Keys.alive``: the client's gpu fallback routing reads it) and, with
    ``lanes``, of each queue's lane (a producer uses a lane only while one is fresh), in Redis."""

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
        self._key = _heartbeat_key(keys, name)
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
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(redis.RedisError):  # the TTLs remove them anyway
            self._client.delete(self._key)
            for key in self._alive:  # another worker of the same queue may own it now
                self._client.eval(_RELEASE, 1, key, self._name)

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


@worker_ready.connect(weak=False)  # type: ignore[untyped-decorator]
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    # Build the runtime now rather than at the first task, so the heartbeat and the
    # metrics endpoint are up while the queues are still empty.
    factory = getattr(getattr(sender, "app", None), "hetbatch_runtime", None)
    if factory is None:
        return
    rt = factory()
    beat = Heartbeat(
        rt.redis,
        rt.keys,
        str(sender.hostname),
        rt.settings,
        lambda: {m.spec.ref: m.spec.queue for m in rt.models.loaded()},
        rt.metrics.port,
        lanes=drains_lane(rt.settings, getattr(sender, "pool", None)),
    )
    sender.app.hetbatch_heartbeat = beat.start()


@worker_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
def _on_worker_shutdown(sender: Any = None, **_: Any) -> None:
    beat = getattr(getattr(sender, "app", None), "hetbatch_heartbeat", None)
    if beat is not None:
        beat.stop()


@dataclass
class WorkerInfo:
    name: str
    pool: str = "?"
    queues: list[str] = field(default_factory=list)
    concurrency: int = 0
    models: dict[str, str] = field(default_factory=dict)
    """Loaded ``name@version`` -> its queue."""
    seen_s_ago: float | None = None
    online: bool | None = None
    metrics_port: int = 0


@dataclass
class StatusReport:
    depths: dict[str, dict[int, int]]
    workers: list[WorkerInfo]

    def to_dict(self) -> dict[str, Any]:
        return {"queues": self.depths, "workers": [asdict(w) for w in self.workers]}


def collect(client: redis.Redis, keys: Keys, *, ping: Callable[[], list[str]] | None = None) -> StatusReport:
    """Queue depths of every known queue, and every worker with a live heartbeat
    (or answering ``ping``, which returns the node names that answered)."""
    workers: dict[str, WorkerInfo] = {}
    now = time.time()
    for key in client.scan_iter(match=_heartbeat_key(keys, "*"), count=500):
        raw = cast(bytes | None, client.get(key))
        if raw is None:
            continue
        rec = json.loads(raw)
        workers[rec["name"]] = WorkerInfo(
            name=rec["name"],
            pool=rec.get("pool", "?"),
            queues=list(rec.get("queues", [])),
            concurrency=int(rec.get("concurrency", 0)),
            models=dict(rec.get("models", {})),
            seen_s_ago=max(0.0, now - float(rec.get("seen", now))),
            metrics_port=int(rec.get("metrics_port", 0)),
        )
    if ping is not None:
        answered = set(ping())
        for name in answered - set(workers):
            workers[name] = WorkerInfo(name=name)
        for info in workers.values():
            info.online = info.name in answered
    queues = [queue_for(f, d) for d in DEVICES for f in FRAMEWORKS]
    queues += sorted({q for w in workers.values() for q in w.queues} - set(queues))
    return StatusReport(queue_depths(client, queues), sorted(workers.values(), key=lambda w: w.name))


def render(report: StatusReport) -> str:
    """One table: a row per (queue, worker consuming it); queues without workers too."""
    head = ("QUEUE", "DEPTH", "BY PRIORITY", "WORKER", "POOL", "THREADS", "ONLINE", "SEEN", "MODELS LOADED")
    rows: list[tuple[str, ...]] = []
    for queue, steps in report.depths.items():
        depth = sum(steps.values())
        by_pri = " ".join(f"{s}:{n}" for s, n in steps.items() if n) or "-"
        consumers = [w for w in report.workers if queue in w.queues]
        if not consumers:
            rows.append((queue, str(depth), by_pri, "-", "-", "-", "-", "-", "-"))
        for i, w in enumerate(consumers):
            online = "?" if w.online is None else ("yes" if w.online else "NO")
            seen = "-" if w.seen_s_ago is None else f"{w.seen_s_ago:.0f}s ago"
            models = ", ".join(m for m, q in w.models.items() if q == queue) or "-"
            first = i == 0
            rows.append((queue if first else "", str(depth) if first else "", by_pri if first else "",
                         w.name, w.pool, str(w.concurrency), online, seen, models))  # fmt: skip
    for w in report.workers:
        if not w.queues:  # answered ping but wrote no heartbeat (older hetbatch?)
            rows.append(("-", "-", "-", w.name, w.pool, "-", "yes" if w.online else "?", "-", "-"))
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in [head, *rows])


def cmd_status(args: argparse.Namespace) -> int:
    from hetbatch.producers.client import make_producer_app

    settings = WorkerSettings.from_env(redis_url=args.redis_url)
    keys = Keys(settings.prefix)
    client = redis.Redis.from_url(settings.redis_url)
    app = make_producer_app(settings.redis_url)

    def ping() -> list[str]:
        replies = app.control.ping(timeout=args.ping_timeout_s) or []
        return [name for reply in replies for name in reply]

    try:
        report = collect(client, keys, ping=ping if args.ping_timeout_s > 0 else None)
        print(json.dumps(report.to_dict(), indent=2) if args.json else render(report))
    finally:
        app.close()
        client.close()
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``hetbatch status`` to the CLI."""
    p = sub.add_parser("status", help="queues, depths, workers, their pools and loaded models")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--ping-timeout-s", type=float, default=1.0, help="wait for worker pings (0: heartbeats only)")
    p.set_defaults(func=cmd_status)
