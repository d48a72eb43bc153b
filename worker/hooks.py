"""What a worker does around its core path, as hooks (dramatiq's middleware, made small).

``Runtime`` decodes, validates, batches and stores; everything else a worker process
does with a finished task or a formed batch is a ``Hook`` that ``worker.process``
registers: metrics (``worker.metrics``), batch statistics in Redis
(``BatchStatsWriter``), dropping consumed inputs (``InputCleanup``) and handing an
ensemble member's result on to fusion (``worker.ensemble``). Every method of ``Hook``
is a no-op, so a hook overrides only what it needs.

A hook runs on the thread that stored the results (or ran the model call) and may
raise: an error from ``after_store`` fails the task, which is what the ensemble
hand-on needs (a Redis error requeues the task, and the hand-on runs again on
redelivery, idempotently).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence

import redis

from hetbatch.producers.protocol.keys import Keys
from hetbatch.producers.protocol.transport import Transport
from hetbatch.producers.protocol.wire import TaskEnvelope
from hetbatch.worker.batching import BatchStats
from hetbatch.worker.results import Done

__all__ = ["BatchStatsWriter", "Finished", "Hook", "InputCleanup"]

log = logging.getLogger(__name__)

Finished = Sequence[tuple[TaskEnvelope, Sequence[Done]]]
"""Tasks whose every item now has a stored result, each with the outcomes this worker
stored for it (none when an earlier delivery had stored them all: a duplicate)."""


class Hook:
    """The hooks ``Runtime`` calls; each a no-op here."""

    def after_store(self, finished: Finished) -> None:
        """Every item of each task in ``finished`` has a stored result (one call per store round trip)."""

    def after_batch(self, ref: str, stats: BatchStats) -> None:
        """The model ``ref`` (``name@version``) finished one call (one formed batch); on the batcher's thread."""

    def close(self) -> None:
        """The worker process is stopping: release threads and connections."""


class InputCleanup(Hook):
    """Deletes the inputs of finished tasks (one DEL per store): the Redis key or
    shared-memory file each one's job id derives (``Transport.consumed``), never a name
    an envelope gives. An ensemble member's input is shared by the other members, so it
    is left to fusion (``worker.ensemble``), which drops it."""

    def __init__(self, client: redis.Redis, transport: Transport) -> None:
        self._client = client
        self._transport = transport

    def after_store(self, finished: Finished) -> None:
        keys, files = self._transport.consumed([env for env, _ in finished])
        self._transport.drop(self._client, keys, files)


_STATS_EVERY_S = 0.05
_FIELDS = ("batches", "rows", "requests", "compute_s", "queue_wait_s", "busy_s")


class BatchStatsWriter(Hook):
    """Sums batch statistics per model into ``Keys.batch_stats`` from its own thread, at
    most every ``_STATS_EVERY_S``: a model call never waits on that write, and many small
    batches cost one pipeline. A Redis outage costs statistics, never the thread."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self._client = client
        self._keys = keys
        self._queue: queue.SimpleQueue[tuple[str, BatchStats] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name="batch-stats", daemon=True)
        self.thread.start()

    def after_batch(self, ref: str, stats: BatchStats) -> None:
        self._queue.put((ref, stats))

    def close(self) -> None:
        self._queue.put(None)
        self.thread.join(timeout=5)

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            entries = [self._queue.get()]
            while not self._queue.empty():
                entries.append(self._queue.get())
            totals: dict[str, list[float]] = {}
            for entry in entries:
                if entry is None:
                    stopping = True
                    continue
                ref, stats = entry
                t = totals.setdefault(ref, [0, 0, 0, 0.0, 0.0, 0.0])
                values = (1, stats.rows, stats.requests, stats.compute_s, stats.queue_wait_s, stats.busy_s)
                for i, value in enumerate(values):
                    t[i] += value
            if totals:
                self._write(totals)
            if not stopping:
                time.sleep(_STATS_EVERY_S)

    def _write(self, totals: dict[str, list[float]]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for ref, values in totals.items():
            key = self._keys.batch_stats(ref)
            for name, value in zip(_FIELDS, values, strict=True):
                if name.endswith("_s"):
                    pipe.hincrbyfloat(key, name, value)
                else:
                    pipe.hincrby(key, name, int(value))
        try:
            pipe.execute()
        except redis.RedisError as exc:
            # A Redis restart must cost a statistic, not the writer.
            log.info("batch stats not recorded: %s", exc)
