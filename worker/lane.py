"""The lane: small jobs drained from Redis many at a time, without Celery's per-message cost.

A producer with ``lane_max_rows`` set pushes a small job's bare envelope onto its
queue's lane list (``producers.protocol.kombu.lane_list``). One thread per worker pops up to
``lane_batch`` envelopes at once (BLMPOP, oldest first), records them in a *held* list
of this worker that expires after ``visibility_timeout_s`` unless renewed, and hands
them to ``Runtime.handle_many``: one ledger round trip, one batched model request per
model, one result round trip for the whole batch.

Never lost: the ledger recorded each job before it was published. A worker that dies
stops renewing its held lists; once they expire, the reconciler finds the jobs neither
queued nor held nor answered and publishes them again (as Celery tasks). A batch that
meets a Redis error goes back onto its lane.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, cast

import redis

from hetbatch.producers.protocol.connect import connect
from hetbatch.producers.protocol.kombu import lane_list
from hetbatch.worker.settings import WorkerSettings

if TYPE_CHECKING:  # the reconciler imports this module without the model stack
    from hetbatch.worker.runtime import Runtime

__all__ = ["LANE_TASK", "Lane", "drains_lane", "held_index", "held_key"]

log = logging.getLogger(__name__)

LANE_TASK = "hetbatch.lane"  # the name Flower shows for a lane batch


def drains_lane(settings: WorkerSettings, pool: object) -> bool:
    """Whether a worker with ``settings`` and Celery ``pool`` drains its queues' lanes:
    not with ``lane_slots=0``, and not beside the prefork pool (lane batches run in this
    process, outside the isolation its child processes give)."""
    return settings.lane_slots > 0 and "prefork" not in type(pool).__module__


def held_key(prefix: str, worker: str, slot: int) -> str:
    """The list holding the envelopes a worker's lane slot is running."""
    return f"{prefix}:lane:held:{worker}:{slot}"


def held_index(prefix: str) -> str:
    """Hash: held list -> until when (unix ms) its worker vouches for it. The reconciler
    reads it instead of scanning for held lists (SCAN is not among the ACL's commands)."""
    return f"{prefix}:lane:held"


class Lane:
    """Drains the lanes of ``queues`` into ``runtime`` (see the module docstring).

    Args:
        runtime: the worker's runtime.
        queues: the queues whose lanes to drain.
        batch: most envelopes taken at once.
        slots: batches running at once (one is decoded or stored while another computes).
        events: the worker's Celery event dispatcher; while task events are on (Flower
            turns them on), each batch is announced as a ``hetbatch.lane`` task.
    """

    def __init__(self, runtime: Runtime, queues: list[str], *, batch: int, slots: int, events: Any = None) -> None:
        self.rt = runtime
        self._events = events
        self.lists = [lane_list(q) for q in queues]
        self.batch = batch
        self.hold_ms = runtime.settings.visibility_timeout_s * 1000
        # Its own connection: BLMPOP blocks it for up to a second.
        self._conn = connect(runtime.settings.redis_url)
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(slots):
            self._free.put(slot)
        self._held: dict[int, str] = {}  # busy slot -> its held list
        self._index = held_index(runtime.keys.prefix)
        self._pool = ThreadPoolExecutor(slots, thread_name_prefix="hetbatch-lane")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hetbatch-lane", daemon=True)
        self._renewed = time.monotonic()

    def start(self) -> Lane:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Take no more; let the running batches finish."""
        self._stop.set()
        self._thread.join(timeout=timeout_s)
        self._pool.shutdown(wait=True)
        self._conn.close()

    def _loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                slot = self._free.get(timeout=1.0)
            except queue.Empty:
                self._renew()
                continue
            try:
                got = cast(
                    list[Any] | None,
                    self._conn.blmpop(1, len(self.lists), *self.lists, direction="RIGHT", count=self.batch),
                )
            except redis.RedisError as exc:  # down, or refused (an ACL without BLMPOP): keep trying, slowly
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    log.warning("lane: cannot take jobs from %s (%s); retrying", ", ".join(self.lists), exc)
                self._free.put(slot)
                self._stop.wait(min(30.0, 0.5 * failures))
                continue
            failures = 0
            if not got:
                self._free.put(slot)
                self._renew()
                continue
            source, raws = got[0].decode(), cast(list[bytes], got[1])
            held = held_key(self.rt.keys.prefix, self.rt.worker_id, slot)
            try:
                pipe = self._conn.pipeline(transaction=False)
                pipe.rpush(held, *raws)
                pipe.pexpire(held, self.hold_ms)
                pipe.hset(self._index, held, self._until())
                pipe.execute()
            except redis.RedisError as exc:  # still runs; the ledger covers the jobs if this worker dies
                log.warning("lane: could not record %d held jobs: %s", len(raws), exc)
            self._held[slot] = held
            self._pool.submit(self._run, slot, source, raws)
            self._renew()

    def _run(self, slot: int, source: str, raws: list[bytes]) -> None:
        held, batch_id, started = self._held[slot], str(uuid.uuid4()), time.monotonic()
        self._event("task-received", uuid=batch_id, name=LANE_TASK, args=f"{len(raws)} jobs from {source}", kwargs="{}")
        self._event("task-started", uuid=batch_id, pid=os.getpid())
        try:
            bodies = []
            for raw in raws:
                try:
                    bodies.append(json.loads(raw))
                except ValueError:
                    log.error("lane: dropped an entry of %s that is not JSON (%d bytes)", source, len(raw))
            summary = self.rt.handle_many(bodies)
            self._release(held)
            self._event("task-succeeded", uuid=batch_id, result=repr(summary), runtime=time.monotonic() - started)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            # Not the jobs' fault: put them back where the next pop finds them first.
            log.warning("lane: Redis failed during a batch of %d (%s); returning it to %s", len(raws), exc, source)
            self._release(held, back=(source, raws))
            self._event("task-retried", uuid=batch_id, exception=repr(exc), traceback="")
        except Exception as exc:
            # Unanswered jobs are published again by the reconciler, up to max_attempts.
            log.exception("lane: a batch of %d from %s failed", len(raws), source)
            self._release(held)
            self._event("task-failed", uuid=batch_id, exception=repr(exc), traceback="")
        finally:  # only now: the slot's next batch reuses the held list's name
            self._held.pop(slot, None)
            self._free.put(slot)

    def _event(self, kind: str, **fields: Any) -> None:
        if self._events is None:
            return
        try:  # sent only while the dispatcher's groups include "task" (Flower's enable_events)
            self._events.send(kind, **fields)
        except Exception as exc:  # monitoring must not cost a batch
            log.debug("lane: event %s not sent: %s", kind, exc)

    def _release(self, held: str, back: tuple[str, list[bytes]] | None = None) -> None:
        """Forget a held list (and first, with ``back``, return its jobs to their lane)."""
        try:
            pipe = self._conn.pipeline(transaction=back is not None)
            if back is not None:
                pipe.rpush(back[0], *reversed(back[1]))
            pipe.delete(held)
            pipe.hdel(self._index, held)
            pipe.execute()
        except redis.RedisError:
            pass  # the held list expires, and the reconciler publishes unanswered jobs again

    def _until(self) -> int:
        return int(time.time() * 1000) + self.hold_ms

    def _renew(self) -> None:
        """Keep the held lists of running batches from expiring (every third of their TTL)."""
        if time.monotonic() - self._renewed < self.hold_ms / 3000:
            return
        self._renewed = time.monotonic()
        held = list(self._held.values())
        if not held:
            return
        try:
            pipe = self._conn.pipeline(transaction=False)
            for key in held:
                pipe.pexpire(key, self.hold_ms)
                pipe.hset(self._index, key, self._until())
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("lane: held lists not renewed: %s", exc)
