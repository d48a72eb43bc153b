"""One worker process, wired in one place.

``WorkerProcess`` owns the parts a worker process runs and their order:

- the Celery app (``worker.app``), whose two tasks call ``predict`` and ``fuse`` here;
- the ``Runtime`` (decode, validate, batch, store), built once, at worker start or at
  the first task, with its hooks: the ensemble hand-on (``worker.ensemble``), metrics
  (``worker.metrics``), batch statistics and input cleanup (``worker.hooks``);
- before Celery starts consuming: the preload models (``preload``, the warm-up gate);
- at worker start: the heartbeat (``worker.heartbeat``), the watchdog
  (``worker.watchdog``: leases and the reconciler) and the lane (``worker.lane``);
  at worker shutdown, the same stopped in reverse.

This is the only module that connects Celery signals; it connects them for its own
app only, so several apps in one process (tests) do not see each other's workers.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown, worker_shutting_down

from hetbatch.producers.protocol import tracing
from hetbatch.worker.app import make_app
from hetbatch.worker.connection import check_redis
from hetbatch.worker.ensemble import EnsembleRunner
from hetbatch.worker.heartbeat import Heartbeat
from hetbatch.worker.hooks import BatchStatsWriter, Hook, InputCleanup
from hetbatch.worker.lane import Lane, drains_lane
from hetbatch.worker.metrics import WorkerMetrics
from hetbatch.worker.runtime import Runtime
from hetbatch.worker.scale_in import pool_option
from hetbatch.worker.settings import WorkerSettings
from hetbatch.worker.watchdog import Watchdog

__all__ = ["WorkerProcess"]

log = logging.getLogger(__name__)
STARTUP_FAILED_EXIT = 4
"""Exit status of a worker whose runtime could not be built (after Celery connected)."""


class _Parts:
    """What ``WorkerProcess`` builds once, with the runtime."""

    def __init__(self, runtime: Runtime, ensembles: EnsembleRunner, metrics: WorkerMetrics, hooks: list[Hook]) -> None:
        self.runtime = runtime
        self.ensembles = ensembles
        self.metrics = metrics
        self.hooks = hooks


class WorkerProcess:
    """A worker process's parts and their wiring (see the module docstring).

    Args:
        settings: the worker's settings.
    """

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.app: Celery = make_app(settings, self)
        self.watchdog = Watchdog(settings)
        self.heartbeat: Heartbeat | None = None
        self.lanes: list[Lane] = []
        self._parts: _Parts | None = None
        self._lock = threading.Lock()
        worker_ready.connect(self._on_ready, weak=False)
        worker_shutdown.connect(self._on_shutdown, weak=False)
        worker_shutting_down.connect(self._on_shutting_down, weak=False)
        self._hostname = ""

    def run(self, name: str, *, loglevel: str = "INFO", pool: str = "threads", extra: Sequence[str] = ()) -> None:
        """Run the Celery worker in this process until it is told to stop.

        Args:
            name: the Celery node name (``%h`` is the host name).
            loglevel: Celery's log level.
            pool: Celery's pool: ``threads`` (what ``hetbatch worker`` runs: Celery's,
                giving prefetched messages back at SIGTERM, ``worker.scale_in``) or
                ``prefork`` (tests of crash isolation; lanes are off with it).
            extra: more Celery worker options.

        Raises:
            BrokerError: Redis refused the login ``redis_login_tries`` times (unless
                ``wait_for_redis``), or refused a command.
            ConfigError: tracing is on and OpenTelemetry does not import.
        """
        s = self.settings
        if s.tracing:
            # The runtime turns tracing on in Celery's worker_ready, whose errors are only
            # logged: the worker would consume anyway and fail every task. Fail here, once.
            tracing.configure(True)
        # Celery would retry a refused login forever, a traceback each time: say it once and exit.
        check_redis(s.redis_url, tries=s.redis_login_tries, wait=s.wait_for_redis)
        # Before Celery connects its consumer: until worker_main runs, no message is
        # reserved, so jobs wait in Redis (where a warm worker takes them) during the load.
        if s.preload_refs and not logging.getLogger().handlers:
            # Celery sets up logging in worker_main, after the preload: until then, its
            # format on stderr (Celery replaces this handler with its own).
            logging.basicConfig(
                level=loglevel.upper(), format="[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"
            )
        self.preload()
        concurrency = self.settings.concurrency if pool == "threads" else 1
        celery_pool = pool_option() if pool == "threads" else pool
        queues = ",".join(self.settings.queue_names)
        argv = ["worker", "-P", celery_pool, "-c", str(concurrency), "-Q", queues, "-n", name,
                "--loglevel", loglevel, "--without-mingle", "--without-gossip",
                *(["-E"] if self.settings.task_events else []), *extra]  # fmt: skip
        self.app.worker_main(argv)

    def preload(self) -> None:
        """Load the models of ``settings.preload`` and make their warm-up call (the load's
        call on zeros, ``ModelCache``), before the worker takes any job: the warm-up gate.

        Raises:
            ModelNotFound: a preload model is not registered.
            ModelLoadError, UnsafeArtifact, MissingFramework: a preload model failed to
                load or failed its warm-up call; the worker does not start.
        """
        refs = self.settings.preload_refs
        if not refs:
            return
        runtime = self.parts().runtime
        for ref in refs:
            started = time.monotonic()
            spec = runtime.registry.model(ref)  # "name" resolves to the latest version now
            log.info("preload %s: loading", spec.ref)
            runtime.models.get(spec)
            log.info("preload %s: loaded and warmed up in %.2f s", spec.ref, time.monotonic() - started)
        log.info("preload: %d model(s) warm; consuming from now on", len(refs))

    # -- the tasks -----------------------------------------------------------------

    def predict(self, body: Any) -> dict[str, Any]:
        """The predict task: run one task body (``Runtime.handle``)."""
        return self.parts().runtime.handle(body)

    def fuse(self, body: Any) -> dict[str, Any]:
        """The fusion task: fuse one ensemble chunk's stage (``EnsembleRunner.handle``)."""
        return self.parts().ensembles.handle(body)

    def runtime(self) -> Runtime:
        """The process's runtime (built on first use)."""
        return self.parts().runtime

    def parts(self) -> _Parts:
        parts = self._parts
        if parts is None:
            with self._lock:  # task threads race for it at start
                if self._parts is None:
                    self._parts = self._build()
                parts = self._parts
        return parts

    def _build(self) -> _Parts:
        runtime = Runtime(self.settings)
        ensembles = EnsembleRunner(runtime, self._send)
        metrics = WorkerMetrics(self.settings, runtime.redis, runtime.models.loaded).start()
        hooks: list[Hook] = [
            ensembles,  # first: a member's hand-on must not wait behind bookkeeping
            metrics,
            BatchStatsWriter(runtime.redis, runtime.keys),
            InputCleanup(runtime.redis, runtime.transport),
        ]
        for hook in hooks:
            runtime.add_hook(hook)
        return _Parts(runtime, ensembles, metrics, hooks)

    def _send(self, name: str, queue: str, body: dict[str, Any], priority: int) -> None:
        self.app.send_task(name, args=[body], queue=queue, priority=priority, retry=True)

    # -- worker start and shutdown ------------------------------------------------

    def _on_ready(self, sender: Any = None, **_: Any) -> None:
        """Celery's ``worker_ready``; ``sender`` is the worker's consumer."""
        if getattr(sender, "app", None) is not self.app:
            return
        # Build the runtime now rather than at the first task, so the heartbeat and the
        # metrics endpoint are up while the queues are still empty.
        try:
            parts = self.parts()
        except Exception as exc:
            # Celery only logs a receiver's error: the worker would go on consuming and fail
            # every task. Exit instead; its prefetched messages come back to the queue.
            log.critical("worker cannot start: %s: %s; fix it, then start the worker again", type(exc).__name__, exc)
            logging.shutdown()
            os._exit(STARTUP_FAILED_EXIT)
        runtime = parts.runtime
        lanes = drains_lane(self.settings, getattr(sender, "pool", None))
        self._hostname = str(sender.hostname)
        self.heartbeat = Heartbeat(
            runtime.redis,
            runtime.keys,
            str(sender.hostname),
            self.settings,
            lambda: {m.spec.ref: m.spec.queue for m in runtime.models.loaded()},
            parts.metrics.port,
            lanes=lanes,
        ).start()
        self.watchdog.start()
        if lanes:
            events = getattr(sender, "event_dispatcher", None)
            s = self.settings
            lane = Lane(runtime, s.queue_names, batch=s.lane_batch, slots=s.lane_slots, events=events)
            self.lanes.append(lane.start())
        elif self.settings.lane_slots > 0:
            log.warning("lane off: with the prefork pool its batches would run in the parent process")
        # Start-up's objects (modules, the app) live as long as the worker: a full
        # collection that walks them all stalls every thread for 40-60 ms.
        gc.freeze()

    def _on_shutting_down(self, sender: Any = None, **_: Any) -> None:
        """Celery's ``worker_shutting_down`` (in its signal handler; ``sender`` is the
        node name): the lanes take no more batches from now on, while Celery drains."""
        if not self._hostname or sender != self._hostname:
            return
        for lane in self.lanes:
            lane.stop_taking()

    def _on_shutdown(self, sender: Any = None, **_: Any) -> None:
        """Celery's ``worker_shutdown``; ``sender`` is the worker."""
        if getattr(sender, "app", None) is not self.app:
            return
        for lane in self.lanes:
            lane.stop()
        self.watchdog.stop()
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self._parts is not None:
            for hook in self._parts.hooks:  # batch statistics still queued are written now
                hook.close()
