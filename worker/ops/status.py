"""Who works on what: the report behind ``hetbatch status``.

It reads the workers' heartbeat records (``worker.heartbeat`` writes them), takes the
node names that answered a ping through Celery's control channel, counts the
messages waiting in every queue (all priority lists of it, and its lane), and counts
the keys jobs hold in Redis by kind (``census``: what docs/reliability.md's lifecycle
says each state owns), so a deployment that leaks keys shows it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import redis

from hetbatch.producers.protocol.connect import connect
from hetbatch.producers.protocol.keys import JOB_KEY_KINDS, Keys
from hetbatch.producers.protocol.kombu import queue_depths
from hetbatch.producers.protocol.wire import DEVICES, FRAMEWORKS, queue_for

__all__ = ["StatusReport", "WorkerInfo", "census", "collect", "render"]


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
    keys: dict[str, int] = field(default_factory=dict)
    """Job keys in Redis by kind (``census``)."""

    def to_dict(self) -> dict[str, Any]:
        return {"queues": self.depths, "workers": [asdict(w) for w in self.workers], "keys": self.keys}


def census(client: redis.Redis, keys: Keys) -> dict[str, int]:
    """How many keys of each kind jobs hold now (``JOB_KEY_KINDS``' names, every kind listed):
    one SCAN over the deployment's prefix, so its cost grows with the keyspace."""
    counts = dict.fromkeys(JOB_KEY_KINDS.values(), 0)
    for key in client.scan_iter(match=keys.everything(), count=1000):
        kind = keys.job_key_kind(key.decode(errors="replace") if isinstance(key, bytes) else str(key))
        if kind is not None:
            counts[kind] += 1
    return counts


def collect(client: redis.Redis, keys: Keys, *, ping: Callable[[], list[str]] | None = None) -> StatusReport:
    """Queue depths of every known queue, and every worker with a live heartbeat
    (or answering ``ping``, which returns the node names that answered)."""
    workers: dict[str, WorkerInfo] = {}
    now = time.time()
    for key in client.scan_iter(match=keys.worker("*"), count=500):
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
    return StatusReport(
        queue_depths(client, queues), sorted(workers.values(), key=lambda w: w.name), census(client, keys)
    )


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
    table = "\n".join("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in [head, *rows])
    if not report.keys:
        return table
    return table + "\n\nJOB KEYS  " + "  ".join(f"{kind} {n}" for kind, n in report.keys.items())


def report(redis_url: str, keys: Keys, *, ping_timeout_s: float = 1.0) -> StatusReport:
    """``collect`` for the deployment at ``redis_url``, pinging workers for up to
    ``ping_timeout_s`` (0: heartbeats only).

    Raises:
        redis.RedisError: Redis is unreachable, or refused a command (credentials, ACL).
    """
    from hetbatch.producers.client import make_producer_app

    client = connect(redis_url)
    try:
        client.ping()  # fail fast on a wrong URL or password, before Celery retries it
        if ping_timeout_s <= 0:
            return collect(client, keys)
        app = make_producer_app(redis_url)

        def ping() -> list[str]:
            replies = app.control.ping(timeout=ping_timeout_s) or []
            return [name for reply in replies for name in reply]

        try:
            return collect(client, keys, ping=ping)
        finally:
            app.close()
    finally:
        client.close()
