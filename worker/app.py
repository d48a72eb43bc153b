"""The worker's Celery app: JSON only, late acks, the predict and fusion tasks.

The app only configures Celery and routes its two tasks to a ``Tasks`` object
(``worker.process.WorkerProcess`` in a worker); it starts nothing and connects no signal.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import redis
from celery import Celery
from celery.exceptions import Reject

from hetbatch.producers.protocol.connect import connect
from hetbatch.producers.protocol.keys import Keys
from hetbatch.producers.protocol.kombu import (
    guarded_strategy,
    patch_worker_transport,
    task_queues,
    worker_transport_options,
)
from hetbatch.producers.protocol.sentinel import broker
from hetbatch.producers.protocol.wire import CELERY_WIRE_CONFIG, FUSE_TASK_NAME, TASK_NAME
from hetbatch.worker.ops.dlq import DeadLetters
from hetbatch.worker.request import RedactedRequest
from hetbatch.worker.settings import WorkerSettings

__all__ = ["Tasks", "make_app"]

log = logging.getLogger(__name__)

# A task class attribute: static, or Celery would call it as a method of the task.
_STRATEGY = staticmethod(guarded_strategy)


class Tasks(Protocol):
    """What the app's tasks call (``worker.process.WorkerProcess``)."""

    def predict(self, body: Any) -> dict[str, Any]: ...

    def fuse(self, body: Any) -> dict[str, Any]: ...


def make_app(settings: WorkerSettings, tasks: Tasks | None = None) -> Celery:
    """A Celery app consuming ``settings.queue_names``; with ``tasks``, its predict and
    fusion tasks call them (without, e.g. for Flower, the app only knows the broker).

    At-least-once: acks after the task (``acks_late``), rejects (requeues) when the
    worker process dies mid-task, and redelivers unacked messages after
    ``visibility_timeout_s`` (a live worker renews the ones it holds: ``worker.watchdog``).
    Results are idempotent, so a redelivery is harmless. A task that fails because Redis
    went away is requeued, not acked.
    """
    # A message of our queues that kombu or Celery cannot take is dead-lettered, not fatal.
    dead_letters = DeadLetters(connect(settings.redis_url), Keys(settings.prefix), result_ttl_s=settings.result_ttl_s)
    patch_worker_transport(settings.queue_names, dead_letters.bury_raw)
    if not settings.task_log:  # Celery's two INFO lines per task; warnings and errors still show
        for name in ("celery.worker.strategy", "celery.app.trace"):
            logging.getLogger(name).setLevel(logging.WARNING)
    broker_url, broker_options = broker(settings.redis_url)  # a sentinel:// URL names its master group
    app = Celery("hetbatch", broker=broker_url, set_as_current=True)
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
        broker_transport_options=worker_transport_options(
            visibility_timeout_s=settings.visibility_timeout_s, restore_interval_s=settings.restore_interval_s
        )
        | broker_options,
        task_queues=task_queues(settings.queue_names),
        task_create_missing_queues=True,
    )
    if tasks is not None:
        _add_tasks(app, tasks)
    return app


def _add_tasks(app: Celery, tasks: Tasks) -> None:
    # RedactedRequest: `celery inspect active` shows model, job id and rows, never a payload.
    @app.task(name=TASK_NAME, ignore_result=True, Request=RedactedRequest, Strategy=_STRATEGY)  # type: ignore[untyped-decorator]
    def predict(envelope: Any) -> dict[str, Any]:
        try:
            return tasks.predict(envelope)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            # Not the job's fault: keep the message (acking it here would lose the job).
            raise Reject(f"Redis unavailable: {exc}", requeue=True) from exc

    @app.task(name=FUSE_TASK_NAME, ignore_result=True, Request=RedactedRequest, Strategy=_STRATEGY)  # type: ignore[untyped-decorator]
    def fuse(continuation: Any) -> dict[str, Any]:
        return tasks.fuse(continuation)
