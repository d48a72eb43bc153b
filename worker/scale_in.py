"""Graceful scale-in: on SIGTERM, prefetched Celery messages go back to their queue at once.

A worker reserves ``concurrency x prefetch_multiplier`` messages; with the threads pool
those that no thread has started wait as futures in the pool's executor, unacked.
Celery's warm shutdown stops consuming, then stops the pool: it cancels those futures
and waits for the running tasks, and only when it closes the broker channel afterwards
does kombu push the cancelled tasks' messages back (``QoS.restore_unacked_once``). A
batch that runs for minutes kept them from every other worker for as long; a SIGKILL
before the end (Kubernetes' grace period) left them to the visibility timeout.

``GracefulThreadPool`` is Celery's threads pool with one change: at stop it first
cancels the futures no thread has started and gives each one's message back through
kombu's own ``QoS.restore_by_tag`` (one MULTI/EXEC: off the unacked hash and index,
onto the right priority list, consumed first), and only then waits for the running
tasks. The pool's stop runs after the consumer's (Celery stops its steps in reverse),
so no message arrives after the give-back. Running tasks finish and ack as before.
"""

from __future__ import annotations

import logging
import threading
import weakref
from concurrent.futures import Future
from typing import Any

from celery.concurrency.thread import TaskPool

__all__ = ["POOL", "GracefulThreadPool", "give_back", "pool_option"]

log = logging.getLogger(__name__)

POOL = f"{__name__}:GracefulThreadPool"
"""Where Celery finds this pool (``celery.concurrency.get_implementation``)."""


def pool_option() -> str:
    """What ``celery worker -P`` takes for this pool: Celery's CLI accepts only its own
    pool names, and ``custom`` names the class in ``ALIASES`` (process-wide)."""
    from celery import concurrency

    concurrency.ALIASES["custom"] = POOL
    return "custom"


def give_back(message: Any) -> bool:
    """Return one delivered, unacknowledged kombu Redis message to its queue now; True
    when it went back (False: Redis failed, and kombu's visibility timeout returns it).

    Call it only in the thread that runs the consumer's event loop (the pool's stop
    does), for a message no task will run or ack: the tag leaves the channel's delivered
    set first, so neither the channel's close nor a late ack touches the message again
    once another worker holds it under the same delivery tag.
    """
    tag = message.delivery_tag
    qos = message.channel.qos
    qos._delivered.pop(tag, None)  # kombu's own bookkeeping: no public way to forget one tag
    try:
        qos.restore_by_tag(tag, leftmost=False)
    except Exception as exc:  # redis errors and kombu's: the visibility timeout is the fallback
        log.warning("scale-in: message %s not given back (%s); it returns after the visibility timeout", tag, exc)
        return False
    return True


class GracefulThreadPool(TaskPool):  # type: ignore[misc]  # Celery is untyped
    """Celery's threads pool that gives back unstarted messages at stop (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # request -> its future; weak: a finished request must not be kept alive here
        self._pending: weakref.WeakKeyDictionary[Any, Future[Any]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def on_apply(self, target: Any, args: Any = None, kwargs: Any = None, callback: Any = None,
                 accept_callback: Any = None, **rest: Any) -> Any:  # fmt: skip
        result = super().on_apply(target, args, kwargs, callback, accept_callback, **rest)
        # Celery passes the request's bound on_accepted: its owner is the request.
        request = getattr(accept_callback, "__self__", None)
        if request is not None and getattr(request, "message", None) is not None:
            with self._lock:
                self._pending[request] = result.f
        return result

    def on_stop(self) -> None:
        # Cancel what no thread started (atomic in the executor), give those back, then wait.
        # Strong references first: a cancelled future's work item held its request's last one.
        with self._lock:
            pending = list(self._pending.items())
            self._pending.clear()
        self.executor.shutdown(wait=False, cancel_futures=True)
        cancelled = [request for request, future in pending if future.cancelled()]
        returned = sum(give_back(request.message) for request in cancelled)
        if cancelled:
            log.info("scale-in: gave %d of %d prefetched messages back to their queues", returned, len(cancelled))
        super().on_stop()
