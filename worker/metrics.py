"""Prometheus metrics of one worker process, served on ``metrics_port`` (0: off).

Counted as tasks finish: jobs (job chunks) and rows by model and outcome (``ok``,
``error``, ``expired``), errors by model and type, and per model call the formed batch
(rows, coalesced requests), the batcher wait of its oldest request and the compute
time. Read at scrape time: model load times and the depth of each of the worker's
queues, every priority list of it counted (``priority`` is kombu's step, 0 highest), and
each queue's backlog of unfinished jobs by state (``hetbatch_backlog``, the autoscaling
signal: ``worker.ops.backlog``).
Time spent in the broker queue before a worker took the task is not measured here;
the queue depth is the signal for that.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import redis

from hetbatch.producers.errors import ConfigError
from hetbatch.producers.protocol.keys import Keys
from hetbatch.producers.protocol.kombu import queue_depths
from hetbatch.worker.batching import BatchStats
from hetbatch.worker.hooks import Finished, Hook
from hetbatch.worker.models import LoadedModel
from hetbatch.worker.ops.backlog import metric_families
from hetbatch.worker.results import Done
from hetbatch.worker.settings import WorkerSettings

__all__ = ["BATCH_ROWS_BUCKETS", "WorkerMetrics"]

log = logging.getLogger(__name__)

BATCH_ROWS_BUCKETS = tuple(float(2**i) for i in range(17))  # 1 .. 65,536 rows
_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_PORTS_TRIED = 16  # several processes on one host (--gpus 0,1) take the next free ports


class _Live:
    """A collector read at scrape time: queue depths, backlogs and model load times."""

    def __init__(
        self, client: redis.Redis, keys: Keys, queues: Sequence[str], loaded: Callable[[], list[LoadedModel]]
    ) -> None:
        self._client = client
        self._keys = keys
        self._queues = list(queues)
        self._loaded = loaded

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        depth = GaugeMetricFamily(
            "hetbatch_queue_depth", "Messages waiting in the broker queue", labels=["queue", "priority"]
        )
        try:
            for queue, steps in queue_depths(self._client, self._queues).items():
                for step, count in steps.items():
                    depth.add_metric([queue, str(step)], count)
        except redis.RedisError as exc:
            log.warning("queue depth not read: %s", exc)
        yield depth
        yield from self._backlog()
        load = GaugeMetricFamily("hetbatch_model_load_seconds", "Time the model took to load", labels=["model"])
        for model in self._loaded():
            load.add_metric([model.spec.ref], model.load_s)
        yield load

    def _backlog(self) -> list[Any]:
        # The autoscaling signal (worker.ops.backlog): the same value from every worker of
        # a queue, so dashboards and scalers take max() across workers, never sum().
        return metric_families(self._client, self._keys, self._queues)


class WorkerMetrics(Hook):
    """The worker's metrics, a runtime hook; every method is a no-op when ``metrics_port`` is 0.

    Raises:
        ConfigError: a port is set but prometheus_client is not installed.
    """

    def __init__(self, settings: WorkerSettings, client: redis.Redis, loaded: Callable[[], list[LoadedModel]]) -> None:
        self.port = 0
        self._server: Any = None
        self._settings = settings
        self.enabled = settings.metrics_port > 0
        if not self.enabled:
            return
        try:
            from prometheus_client import CollectorRegistry, Counter, Histogram
        except ImportError as exc:
            raise ConfigError(
                "metrics_port is set but prometheus_client is missing: pip install 'hetbatch[metrics]'"
            ) from exc
        self.registry = CollectorRegistry()
        reg = self.registry
        self.jobs = Counter("hetbatch_jobs", "Job chunks finished", ["model", "outcome"], registry=reg)
        self.rows = Counter("hetbatch_rows", "Rows of finished job chunks", ["model", "outcome"], registry=reg)
        self.errors = Counter("hetbatch_errors", "Failed job chunks by error type", ["model", "type"], registry=reg)
        self.batch_rows = Histogram(
            "hetbatch_batch_rows", "Rows per formed batch (one model call)", ["model"],
            buckets=BATCH_ROWS_BUCKETS, registry=reg,
        )  # fmt: skip
        self.batch_requests = Histogram(
            "hetbatch_batch_requests", "Job chunks coalesced into one batch", ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=reg,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "hetbatch_queue_wait_seconds", "Batcher wait of a batch's oldest request", ["model"],
            buckets=_SECONDS_BUCKETS, registry=reg,
        )  # fmt: skip
        self.compute = Histogram(
            "hetbatch_compute_seconds", "Model call time per batch", ["model"], buckets=_SECONDS_BUCKETS, registry=reg
        )
        self.padded = Histogram(
            "hetbatch_padded_fraction", "Padded elements / all elements of a batch's calls (ragged inputs only)",
            ["model"], buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75), registry=reg,
        )  # fmt: skip
        reg.register(_Live(client, Keys(settings.prefix), settings.queue_names, loaded))

    def start(self) -> WorkerMetrics:
        """Serve ``/metrics`` on the first free port from ``metrics_port``.

        Raises:
            OSError: no port of the range could be bound.
        """
        if not self.enabled or self._server is not None:
            return self
        from prometheus_client import start_http_server

        first = self._settings.metrics_port
        for port in range(first, first + _PORTS_TRIED):
            try:
                self._server, _ = start_http_server(port, addr=self._settings.metrics_address, registry=self.registry)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                continue
            self.port = port
            if port != first:
                log.warning("metrics port %d is taken; serving metrics on %d", first, port)
            log.info("metrics on http://%s:%d/metrics", self._settings.metrics_address, port)
            return self
        raise OSError(errno.EADDRINUSE, f"metrics ports {first}..{first + _PORTS_TRIED - 1} are all taken")

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def close(self) -> None:
        self.stop()

    def after_store(self, finished: Finished) -> None:
        for env, done in finished:
            self.observe_done(env.ref, done)

    def after_batch(self, ref: str, stats: BatchStats) -> None:
        self.observe_batch(ref, stats)

    def observe_done(self, model: str, done: Sequence[Done]) -> None:
        """Count the finished jobs and rows of one task (``model`` is ``name@version``)."""
        if not self.enabled:
            return
        for d in done:
            outcome = "ok"
            if d.error is not None:
                outcome = "expired" if d.error.type == "JobExpired" else "error"
                self.errors.labels(model, d.error.type).inc(len(d.items))
            self.jobs.labels(model, outcome).inc(len(d.items))
            self.rows.labels(model, outcome).inc(sum(item.rows for item in d.items))

    def observe_batch(self, model: str, stats: BatchStats) -> None:
        """Record one model call."""
        if not self.enabled:
            return
        self.batch_rows.labels(model).observe(stats.rows)
        self.batch_requests.labels(model).observe(stats.requests)
        self.queue_wait.labels(model).observe(stats.queue_wait_s)
        self.compute.labels(model).observe(stats.compute_s)
        if stats.padded_fraction is not None:
            self.padded.labels(model).observe(stats.padded_fraction)
