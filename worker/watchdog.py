"""The worker's watchdog thread: leases on the messages it holds, and the leader's reconciler.

Leases: kombu's Redis transport records each delivered, unacked message in the zset
``unacked_index`` with its delivery time, and gives it back to the queue once that
time is older than ``visibility_timeout_s``. A live worker refreshes the time of every
message it holds every ``lease_interval_s``, so its long tasks and its prefetched
messages are never redelivered behind its back; a SIGKILLed worker stops refreshing,
and its messages come back within ``visibility_timeout_s`` plus kombu's restore
interval. A message is not refreshed past ``max_hold_s``, so a request the worker
forgot about cannot be held forever.

Leader: every worker tries to take a Redis lock with a TTL; the holder runs the
reconciler (``worker.ops.reconciler``) every ``reconcile_interval_s``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis

from hetbatch.producers.protocol.connect import connect
from hetbatch.producers.protocol.keys import Keys
from hetbatch.producers.protocol.kombu import renew_unacked
from hetbatch.worker.ops.reconciler import LeaderLock, Reconciler, Republisher
from hetbatch.worker.settings import WorkerSettings

__all__ = ["Watchdog", "held_delivery_tags"]

log = logging.getLogger(__name__)


def held_delivery_tags() -> list[str]:
    """Delivery tags of the messages this worker process has received and not finished."""
    from celery.worker import state

    for _ in range(5):
        try:
            requests = list(state.reserved_requests) + list(state.active_requests)
            break
        except RuntimeError:  # the weak sets changed while being copied: try again
            continue
    else:
        return []
    tags = set()
    for req in requests:
        tag = getattr(getattr(req, "message", None), "delivery_tag", None)
        if tag:
            tags.add(str(tag))
    return sorted(tags)


class Watchdog(threading.Thread):
    """Renews leases every ``lease_interval_s``; reconciles every ``reconcile_interval_s`` when leader."""

    def __init__(self, settings: WorkerSettings) -> None:
        super().__init__(name="hetbatch-watchdog", daemon=True)
        self.settings = settings
        self.redis = connect(settings.redis_url)
        self._stop_event = threading.Event()
        self._first_seen: dict[str, float] = {}
        self._reconciler: Reconciler | None = None
        self._publisher: Republisher | None = None
        self._lock = LeaderLock(
            self.redis, Keys(settings.prefix).leader(), ttl_s=max(3 * settings.reconcile_interval_s, 5.0)
        )
        self._last_sweep = 0.0

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        while not self._stop_event.wait(self.settings.lease_interval_s):
            try:
                self.renew_leases()
                if self.settings.reconcile and self._lock.acquire():
                    self._maybe_sweep()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.info("watchdog: Redis unreachable (%s); retrying", exc)
            except Exception:  # the watchdog must outlive any single failure
                log.exception("watchdog tick failed")
        if self._publisher is not None:
            self._publisher.close()
        self.redis.close()

    def renew_leases(self) -> int:
        """Refresh the delivery time of every held message; returns how many were refreshed."""
        now = time.time()
        tags = held_delivery_tags()
        seen = {t: self._first_seen.get(t, now) for t in tags}
        self._first_seen = seen
        fresh = {t: now for t, first in seen.items() if now - first < self.settings.max_hold_s}
        return renew_unacked(self.redis, fresh)

    def _maybe_sweep(self) -> None:
        now = time.monotonic()
        if now - self._last_sweep < self.settings.reconcile_interval_s:
            return
        self._last_sweep = now
        if self._reconciler is None:
            self._publisher = Republisher(self.settings.redis_url)
            self._reconciler = Reconciler(
                self.redis,
                Keys(self.settings.prefix),
                self._publisher.publish,
                overdue_s=self.settings.overdue_s,
                max_attempts=self.settings.max_attempts,
                result_ttl_s=self.settings.result_ttl_s,
            )
        self._reconciler.sweep()

    def describe(self) -> dict[str, Any]:
        return {"held": len(self._first_seen), "leader_key": self._lock.key}
