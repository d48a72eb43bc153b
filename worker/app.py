"""The worker's Celery app: JSON only, late acks, one predict task."""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from producers.publish import TRANSPORT_OPTIONS
from producers.wire import CELERY_WIRE_CONFIG, FUSE_TASK_NAME, TASK_NAME
from worker.ensemble import EnsembleRunner
from worker.runtime import Runtime
from worker.settings import WorkerSettings

__all__ = ["make_app"]


def make_app(settings: WorkerSettings) -> Celery:
    """A Celery app consuming ``settings.queue_names``.

    At-least-once: acks after the task (``acks_late``), rejects (requeues) when the
    worker process dies mid-task, and redelivers unacked messages after
    ``visibility_timeout_s``. Results are idempotent, so a redelivery is harmless.
    """
    app = Celery("hetbatch", broker=settings.redis_url, set_as_current=True)
    app.conf.update(
        CELERY_WIRE_CONFIG,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=settings.prefetch_multiplier,
        worker_send_task_events=True,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s, **TRANSPORT_OPTIONS},
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
        return runtime().handle(envelope)

    @app.task(name=FUSE_TASK_NAME, ignore_result=True)  # type: ignore[untyped-decorator]
    def fuse(continuation: Any) -> dict[str, Any]:
        runtime()
        return ensembles["runner"].handle(continuation)

    app.hetbatch_runtime = runtime  # for tests and status
    return app
