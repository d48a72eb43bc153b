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

Never stopped by what it pops: an envelope refused for a field whose ``items`` (or
pack) can still be read is answered with the typed ``PayloadError`` for those jobs, as
on the Celery path (``Runtime.handle``), so their producer does not wait for a timeout;
an entry that names no job (not JSON, the wrong shape, over the size limit) is
dead-lettered raw (``DeadLetters.bury_raw``: capped bytes, the reason, the lane) and
the batch goes on; an error the loop itself meets is logged and the loop goes on.
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

from hetbatch.producers.errors import PayloadError
from hetbatch.producers.protocol.connect import connect
from hetbatch.producers.protocol.keys import lane_list
from hetbatch.producers.protocol.wire import TaskEnvelope, answerable
from hetbatch.worker.settings import WorkerSettings

if TYPE_CHECKING:  # the reconciler imports this module without the model stack
    from hetbatch.worker.runtime import Runtime

__all__ = ["LANE_TASK", "Lane", "decode_entry", "drains_lane", "parse_entry"]

log = logging.getLogger(__name__)

LANE_TASK = "hetbatch.lane"  # the name Flower shows for a lane batch


def drains_lane(settings: WorkerSettings, pool: object) -> bool:
    """Whether a worker with ``settings`` and Celery ``pool`` drains its queues' lanes:
    not with ``lane_slots=0``, and not beside the prefork pool (lane batches run in this
    process, outside the isolation its child processes give)."""
    return settings.lane_slots > 0 and "prefork" not in type(pool).__module__


def decode_entry(raw: bytes, max_bytes: int) -> TaskEnvelope:
    """The envelope a lane entry holds.

    Raises:
        PayloadError: the entry is over ``max_bytes``, not JSON, or not an envelope.
    """
    return TaskEnvelope.from_dict(parse_entry(raw, max_bytes))


def parse_entry(raw: bytes, max_bytes: int) -> Any:
    """A lane entry's JSON, not yet checked as an envelope.

    Raises:
        PayloadError: the entry is over ``max_bytes`` or not JSON.
    """
    if len(raw) > max_bytes:
        raise PayloadError(f"lane entry of {len(raw)} bytes is over the {max_bytes}-byte limit")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise PayloadError(f"lane entry is not JSON: {exc}") from exc


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
        # An inline payload rides base64 in the entry: 4/3 of the payload limit, plus the envelope.
        self._max_entry = runtime.settings.max_payload_bytes * 4 // 3 + 65_536
        # Its own connection: BLMPOP blocks it for up to a second.
        self._conn = connect(runtime.settings.redis_url)
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(slots):
            self._free.put(slot)
        self._held: dict[int, str] = {}  # busy slot -> its held list
        self._index = runtime.keys.held_index()
        self._pool = ThreadPoolExecutor(slots, thread_name_prefix="hetbatch-lane")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hetbatch-lane", daemon=True)
        self._renewed = time.monotonic()

    def start(self) -> Lane:
        self._thread.start()
        return self

    def stop_taking(self) -> None:
        """Take no more batches (at SIGTERM: the running ones go on); safe in a signal handler."""
        self._stop.set()

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
                failures = self._take(slot, failures)
            except Exception:  # the lane outlives any one failure; the ledger covers its jobs
                log.exception("lane: taking a batch failed; going on")
                if slot not in self._held:
                    self._free.put(slot)
                self._stop.wait(1.0)

    def _take(self, slot: int, failures: int) -> int:
        """Pop one batch into ``slot`` and start it; returns the count of failed pops in a row."""
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
            return failures
        if not got:
            self._free.put(slot)
            self._renew()
            return 0
        source, raws = got[0].decode(), cast(list[bytes], got[1])
        held = self.rt.keys.held(self.rt.worker_id, slot)
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
        return 0

    def _run(self, slot: int, source: str, raws: list[bytes]) -> None:
        held, batch_id, started = self._held[slot], str(uuid.uuid4()), time.monotonic()
        self._event("task-received", uuid=batch_id, name=LANE_TASK, args=f"{len(raws)} jobs from {source}", kwargs="{}")
        self._event("task-started", uuid=batch_id, pid=os.getpid())
        good = raws  # what goes back to the lane if Redis fails
        try:
            envs, good = self._decode(source, raws)
            try:
                summary = self.rt.handle_many(envs)
            except (redis.ConnectionError, redis.TimeoutError):
                raise
            except Exception:
                log.exception("lane: a batch of %d from %s failed; running its jobs one at a time", len(envs), source)
                summary = self._one_at_a_time(envs)
            self._release(held)
            self._event("task-succeeded", uuid=batch_id, result=repr(summary), runtime=time.monotonic() - started)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            # Not the jobs' fault: put them back where the next pop finds them first.
            log.warning("lane: Redis failed during a batch of %d (%s); returning it to %s", len(raws), exc, source)
            self._release(held, back=(source, good) if good else None)
            self._event("task-retried", uuid=batch_id, exception=repr(exc), traceback="")
        except Exception as exc:
            # Unanswered jobs are published again by the reconciler, up to max_attempts.
            log.exception("lane: a batch of %d from %s failed", len(raws), source)
            self._release(held)
            self._event("task-failed", uuid=batch_id, exception=repr(exc), traceback="")
        finally:  # only now: the slot's next batch reuses the held list's name
            self._held.pop(slot, None)
            self._free.put(slot)

    def _one_at_a_time(self, envs: list[TaskEnvelope]) -> dict[str, Any]:
        """Run each envelope alone; one that still fails is dead-lettered (its jobs get a
        ``PoisonJob`` error now rather than after the reconciler's attempts).

        Raises:
            redis.ConnectionError, redis.TimeoutError: Redis failed (the batch goes back).
        """
        dead = 0
        for env in envs:
            try:
                self.rt.handle_many([env])
            except (redis.ConnectionError, redis.TimeoutError):
                raise
            except Exception as exc:
                log.exception("lane: %s failed alone; dead-lettering it", env.describe())
                self.rt.dead_letters.bury(env, 0, f"the worker failed on it: {type(exc).__name__}: {exc}")
                dead += 1
        return {"tasks": len(envs), "dead_lettered": dead}

    def _decode(self, source: str, raws: list[bytes]) -> tuple[list[TaskEnvelope], list[bytes]]:
        """The envelopes of ``raws`` and their entries; every other entry is answered with
        its refusal when it names jobs, else dead-lettered raw.

        Raises:
            redis.RedisError: a refusal or a dead letter could not be written.
        """
        envs: list[TaskEnvelope] = []
        good: list[bytes] = []
        for raw in raws:
            body: Any = None
            try:
                body = parse_entry(raw, self._max_entry)
                envs.append(TaskEnvelope.from_dict(body))
                good.append(raw)
            except Exception as exc:  # PayloadError, or anything a hostile entry finds
                if body is not None and answerable(body) is not None:
                    # Its jobs can be named: Runtime.handle stores the typed refusal as their
                    # result, exactly as for the same envelope sent as a Celery task.
                    self.rt.handle(body)
                    continue
                reason = str(exc) if isinstance(exc, PayloadError) else f"{type(exc).__name__}: {exc}"
                task_id = self.rt.dead_letters.bury_raw(raw, f"not a task envelope: {reason}", source)
                log.error("lane: an entry of %s (%d bytes) is not an envelope; dead-lettered as %s: %s",
                          source, len(raw), task_id, reason[:200])  # fmt: skip
        return envs, good

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
