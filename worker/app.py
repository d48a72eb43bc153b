"""The worker's Celery app: JSON only, late acks, one predict task."""

from __future__ import annotations

import gc
import logging
import threading
from typing import Any

import redis
from celery import Celery
from celery.exceptions import Reject
from celery.signals import worker_ready, worker_shutdown
from kombu import Exchange, Queue

from hetbatch.producers.protocol.kombu import TRANSPORT_OPTIONS
from hetbatch.producers.protocol.wire import CELERY_WIRE_CONFIG, FUSE_TASK_NAME, TASK_NAME
from hetbatch.worker.ensemble import EnsembleRunner
from hetbatch.worker.lane import Lane, drains_lane
from hetbatch.worker.runtime import Runtime
from hetbatch.worker.settings import WorkerSettings
from hetbatch.worker.transport import reuse_redis_clients
from hetbatch.worker.watchdog import Watchdog

__all__ = ["make_app"]

log = logging.getLogger(__name__)


def make_app(settings: WorkerSettings) -> Celery:
    """A Celery app consuming ``settings.queue_names``.

    At-least-once: acks after the task (``acks_late``), rejects (requeues) when the
    worker process dies mid-task, and redelivers unacked messages after
    ``visibility_timeout_s`` (a live worker renews the ones it holds: ``worker.watchdog``).
    Results are idempotent, so a redelivery is harmless. A task that fails because Redis
    went away is requeued, not acked.
    """
    reuse_redis_clients()
    if not settings.task_log:  # Celery's two INFO lines per task; warnings and errors still show
        for name in ("celery.worker.strategy", "celery.app.trace"):
            logging.getLogger(name).setLevel(logging.WARNING)
    app = Celery("hetbatch", broker=settings.redis_url, set_as_current=True)
    app.conf.update(
        CELERY_WIRE_CONFIG,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=settings.prefetch_multiplier,
        worker_send_task_events=settings.task_events,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": settings.restore_interval_s,
            "unacked_restore_throttle": 1,
            "unacked_mutex_expire": max(10, settings.restore_interval_s * 4),
            **TRANSPORT_OPTIONS,
        },
        task_queues=[Queue(q, Exchange(q), routing_key=q) for q in settings.queue_names],
        task_create_missing_queues=True,
    )
    state: dict[str, Runtime] = {}
    ensembles: dict[str, EnsembleRunner] = {}
    lock = threading.Lock()

    def send(name: str, queue: str, body: dict[str, Any], priority: int) -> None:
        app.send_task(name, args=[body], queue=queue, priority=priority, retry=True)

    def runtime() -> Runtime:
        rt = state.get("rt")
        if rt is None:
            with lock:
                rt = state.get("rt")
                if rt is None:
                    rt = Runtime(settings)
                    ensembles["runner"] = EnsembleRunner(rt, send)
                    rt.after_store.append(ensembles["runner"].on_stored)
                    state["rt"] = rt
        return rt

    @app.task(name=TASK_NAME, ignore_result=True)  # type: ignore[untyped-decorator]
    def predict(envelope: Any) -> dict[str, Any]:
        try:
            return runtime().handle(envelope)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            # Not the job's fault: keep the message (acking it here would lose the job).
            raise Reject(f"Redis unavailable: {exc}", requeue=True) from exc

    watchdog = Watchdog(settings)
    lanes: list[Lane] = []

    @worker_ready.connect(weak=False)  # type: ignore[untyped-decorator]
    def _start_watchdog(sender: Any = None, **_: Any) -> None:
        watchdog.start()
        if drains_lane(settings, getattr(sender, "pool", None)):
            events = getattr(sender, "event_dispatcher", None)  # sender: the worker's consumer
            lane = Lane(
                runtime(), settings.queue_names, batch=settings.lane_batch, slots=settings.lane_slots, events=events
            )
            lanes.append(lane.start())
        elif settings.lane_slots > 0:
            log.warning("lane off: with the prefork pool its batches would run in the parent process")
        # Start-up's objects (modules, the app) live as long as the worker: a full
        # collection that walks them all stalls every thread for 40-60 ms.
        gc.freeze()

    @worker_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
    def _stop_watchdog(**_: Any) -> None:
        for lane in lanes:
            lane.stop()
        watchdog.stop()

    @app.task(name=FUSE_TASK_NAME, ignore_result=True)  # type: ignore[untyped-decorator]
    def fuse(continuation: Any) -> dict[str, Any]:
        runtime()
        return ensembles["runner"].handle(continuation)

    app.hetbatch_runtime = runtime  # for tests and status
    return app
