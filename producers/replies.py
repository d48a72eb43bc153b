"""Replies: how a client learns that its jobs finished, for ``Client`` and ``AsyncClient`` alike.

Workers store each result under ``Keys.result`` and push a notice on the producer's
reply list (``Keys.reply(client id)``). A client drains that list with one listener
and wakes the jobs the notices name; a job also reads its result keys now and then,
so a missed notice costs a second, not the job.

The logic is written once, as generators that yield the Redis reads and waits they
need (``Mget``, ``Exists``, ``Blpop``, ``Lpop``, ``Wait``, in ``producers.steps``): ``run`` performs them with a
blocking client for ``Client``, ``arun`` awaits them with ``redis.asyncio`` for
``AsyncClient``. So both clients count a LOST job as done, raise ``JobLost`` when the
job's record vanished, skip a malformed notice without ending the listener, and read
a result stored in parts back whole (``join_steps``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, cast

import redis

from hetbatch.producers.errors import JobDeleted, JobFailed, JobLost, JobTimeout
from hetbatch.producers.jobs import Job, status_of
from hetbatch.producers.protocol import parts
from hetbatch.producers.protocol.connect import connect
from hetbatch.producers.protocol.keys import Keys
from hetbatch.producers.protocol.ledger import Attempt, Ledger
from hetbatch.producers.protocol.retention import delete_job
from hetbatch.producers.protocol.transport import Transport
from hetbatch.producers.protocol.wire import Status, decode_notice
from hetbatch.producers.steps import Blpop, Exists, Lpop, Mget, Step, Steps, Wait, arun, join_steps, run

__all__ = [
    "WAKE",
    "Blpop",
    "Exists",
    "Inbox",
    "Lpop",
    "Mget",
    "Replies",
    "Step",
    "Wait",
    "arun",
    "collect_steps",
    "join_steps",
    "listen_steps",
    "run",
    "status_steps",
]

log = logging.getLogger(__name__)

WAKE = b"wake"  # pushed on the reply list by close() to end a BLPOP early: not a notice
_BLPOP_TIMEOUT_S = 1
_SWEEP_S = 1.0  # how often a listened-for job reads its result keys anyway
_POLL_S = 0.05  # how often a job nobody listens for reads them
_BACKOFF_S = 0.2  # Redis restarting: wait this long between tries


class Signal(Protocol):
    """What wakes a waiting job: a ``threading.Event`` or an ``asyncio.Event``."""

    def set(self) -> None: ...

    def clear(self) -> None: ...


class Inbox:
    """The notices received for each tracked unit (a job, or a pack of jobs), and the
    signal that wakes its waiter. Thread-safe: a listener thread delivers while callers read.

    Args:
        signal: makes the wake-up signal of a newly tracked unit.
    """

    def __init__(self, signal: Callable[[], Signal]) -> None:
        self._signal = signal
        self._lock = threading.Lock()
        self._units: dict[str, tuple[int, dict[int, bytes | None], Signal]] = {}
        self.malformed = 0  # notices skipped because they could not be decoded

    def track(self, unit: str, chunks: int) -> None:
        """Collect the notices of ``unit``'s ``chunks`` chunks (before its tasks are published)."""
        with self._lock:
            if unit not in self._units:  # the jobs of a pack share their pack's notice
                self._units[unit] = (chunks, {}, self._signal())

    def untrack(self, unit: str) -> None:
        with self._lock:
            self._units.pop(unit, None)

    def signal(self, unit: str) -> Signal | None:
        with self._lock:
            got = self._units.get(unit)
        return None if got is None else got[2]

    def noticed(self, unit: str) -> dict[int, bytes | None]:
        """Chunk -> the result bytes a notice carried (``None``: read the key) for ``unit``."""
        with self._lock:
            got = self._units.get(unit)
            return {} if got is None else dict(got[1])

    def deliver(self, batch: Iterable[bytes]) -> None:
        """Hand each notice of ``batch`` to its unit's waiter. A malformed notice (or one
        for a unit not tracked: collected, deleted, or another client's) is skipped."""
        woken: list[Signal] = []
        with self._lock:
            for raw in batch:
                if raw == WAKE:
                    continue
                try:
                    notice = decode_notice(raw)
                except Exception as exc:  # hostile bytes: PayloadError, or [id, 1e400] overflowing int()
                    self.malformed += 1
                    if self.malformed <= 3 or self.malformed % 1000 == 0:
                        log.warning("skipped %d malformed reply notice(s): %s", self.malformed, exc)
                    continue
                got = self._units.get(notice.job_id)
                if got is None or not 0 <= notice.chunk < got[0]:
                    continue
                got[1].setdefault(notice.chunk, notice.result)
                woken.append(got[2])
        for signal in woken:
            signal.set()


def listen_steps(inbox: Inbox, reply_key: str, stopping: Callable[[], bool]) -> Steps[None]:
    """Drain ``reply_key`` into ``inbox`` until ``stopping()``. Nothing ends it but that:
    connection errors wait and retry, any other error is logged and retried."""
    while not stopping():
        try:
            first = yield Blpop(reply_key, _BLPOP_TIMEOUT_S)
            if first is None:
                continue
            # The first notice is handed on before more are fetched: one round trip
            # less between a lone job's result and its caller.
            inbox.deliver([cast(bytes, first[1])])
            while more := cast(list[bytes] | None, (yield Lpop(reply_key, 1024))):
                inbox.deliver(more)
        except (redis.ConnectionError, redis.TimeoutError):
            yield Wait(None, _BACKOFF_S)
        except Exception:  # e.g. WRONGTYPE: someone wrote the reply key; jobs still sweep their keys
            log.exception("reply listener on %s: error; retrying in 1 s", reply_key)
            yield Wait(None, 1.0)


def collect_steps(
    inbox: Inbox, keys: Keys, job: Job, timeout_s: float | None, on_stored: Callable[[int, bytes], None] | None = None
) -> Steps[dict[int, bytes]]:
    """Wait for every chunk of ``job``'s unit (the job, or its pack); its stored result bytes.
    ``on_stored`` is handed each chunk's stored value as soon as it is known (``Replies`` reads
    a result file then, while the worker still runs the other chunks).

    Raises:
        JobDeleted: the job was deleted or purged (its tombstone says so).
        JobLost: the job's record vanished from Redis with its results missing.
        JobTimeout: not finished within ``timeout_s``.
    """
    unit, chunks = job.unit, job.chunks
    listened = inbox.signal(unit) is not None
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    payloads: dict[int, bytes] = {}
    handed: set[int] = set()
    # Without a listener the keys are all there is to read: read them often.
    interval = _SWEEP_S if listened else _POLL_S
    sweep = time.monotonic() + interval if listened else 0.0
    while True:
        read: list[int] = []
        if listened:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            yield Wait(unit, _SWEEP_S if remaining is None else min(_SWEEP_S, remaining))
            noticed = inbox.noticed(unit)
            payloads.update({c: v for c, v in noticed.items() if v is not None})
            # Results announced without their bytes are read as they come, while the
            # other chunks still run, not all at the end.
            read = [c for c in noticed if c not in payloads]
        missing = [c for c in range(chunks) if c not in payloads]
        swept = time.monotonic() >= sweep
        if swept:
            # Now and then read every missing key: a notice can be missed when a client
            # restarts, but the stored result cannot.
            read, sweep = missing, time.monotonic() + interval
        try:
            recorded = True
            ended: bytes | None = None
            if read:
                # A sweep reads the job's record and tombstone in the same MGET: one command, not three.
                record = [keys.job(unit), keys.gone(unit)] if swept else []
                stored = yield Mget([keys.result(unit, c) for c in read] + record)
                payloads.update({c: v for c, v in zip(read, stored, strict=False) if v is not None})
                recorded = not swept or stored[-2] is not None
                ended = stored[-1] if swept else None
            for chunk in sorted(payloads.keys() - handed):
                handed.add(chunk)
                if on_stored is not None:
                    on_stored(chunk, payloads[chunk])
            if len(payloads) == chunks:
                yield from join_steps(keys, job.id, job.unit, payloads)
                inbox.untrack(unit)
                return payloads
            if not recorded and ended:
                how = ended.decode(errors="replace")
                raise JobDeleted(job.id, f"it was {how} (Job.delete or Client.purge); it will never run")
            if not recorded:
                # The job's record went (deleted, or Redis restarted without persistence):
                # no worker will ever answer, so say so instead of waiting.
                raise JobLost(
                    job.id, "its record vanished from Redis (deleted, or Redis restarted without persistence?)"
                )
        except (redis.ConnectionError, redis.TimeoutError):
            yield Wait(None, _BACKOFF_S)  # Redis restarting: keep waiting within timeout_s
        if deadline is not None and time.monotonic() >= deadline:
            raise JobTimeout(
                job.id,
                f"{len(payloads)}/{chunks} chunks done after {timeout_s} s; are workers running for "
                f"model {job.model}? ('hetbatch status' shows queues and workers)",
            )
        if not listened:
            yield Wait(None, _POLL_S)


def status_steps(keys: Keys, job: Job) -> Steps[Status]:
    """Where ``job`` stands, read from Redis (no waiting)."""
    stored = yield Mget([keys.result(job.unit, c) for c in range(job.chunks)])
    recorded = all(v is not None for v in stored) or bool((yield Exists(keys.job(job.unit))))
    if job.pack is not None and any(parts.is_manifest(v) for v in stored):
        # A pack's items' outcomes are in its result's header: read the parts. (A job's
        # manifest alone says done: only results that succeeded are stored in parts.)
        payloads = {c: v for c, v in enumerate(stored) if v is not None}
        try:
            yield from join_steps(keys, job.id, job.unit, payloads)
        except JobLost:
            return Status.LOST
        except JobFailed:
            return Status.FAILED
        stored = [payloads.get(c) for c in range(job.chunks)]
    return status_of(stored, recorded, job.index if job.pack is not None else None)


class Replies:
    """The replies of one ``Client``: a listener thread on its reply list (started on the
    first tracked job), and blocking ``collect`` and ``status`` for its jobs.

    Args:
        client: the Redis holding results and the reply list.
        keys: the deployment's key names.
        ledger: attempts are read from it.
        transport: deletes a job's inputs.
        reply_key: this client's reply list.
        url: where the listener opens its own connection.
        listen: run the listener thread; without it results are read from their keys.
        inbox: track jobs in this inbox instead (``AsyncClient``'s, whose coroutine listens).
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        ledger: Ledger,
        transport: Transport,
        reply_key: str,
        url: str,
        *,
        listen: bool = True,
        inbox: Inbox | None = None,
    ) -> None:
        self.redis = client
        self.keys = keys
        self.ledger = ledger
        self.transport = transport
        self.reply_key = reply_key
        self.inbox = inbox or Inbox(threading.Event)
        self._url = url
        self._listen = listen
        self._tracks = listen or inbox is not None
        self._listener: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = threading.Event()
        # Result files read while their job's other chunks ran, by unit: kept until the job's
        # result is assembled (``read_files``), so a collect that times out loses none of them.
        self._early: dict[str, dict[int, bytes | memoryview]] = {}

    def track(self, unit: str, chunks: int) -> None:
        """Wait for the notices of ``unit`` (a job, or a pack of jobs): call before publishing."""
        if not self._tracks:  # results are read from their keys
            return
        self.inbox.track(unit, chunks)
        if self._listen and self._listener is None:
            with self._lock:
                if self._listener is None:
                    self._listener = threading.Thread(target=self._drain, name="hetbatch-replies", daemon=True)
                    self._listener.start()

    def untrack(self, unit: str) -> None:
        self.inbox.untrack(unit)

    def collect(self, job: Job, timeout_s: float | None) -> dict[int, bytes]:
        """Wait for ``job``'s unit; its stored results (see ``collect_steps``)."""
        return run(collect_steps(self.inbox, self.keys, job, timeout_s, self._reader(job)), self._do)

    def _reader(self, job: Job) -> Callable[[int, bytes], None] | None:
        """Reads each result file of ``job`` as its reference comes in: the client copies
        one chunk's result out while the worker computes the next, not all at the end."""
        if job.pack is not None or not self.transport.shm_dir:  # a pack's result is never a file
            return None
        with self._lock:
            early = self._early.setdefault(job.unit, {})

        def read(chunk: int, value: bytes) -> None:
            if chunk not in early and parts.is_file_ref(value):
                early[chunk] = self.transport.read_results(job.id, job.unit, {chunk: value})[chunk]

        return read

    def status(self, job: Job) -> Status:
        return run(status_steps(self.keys, job), self._do)

    def attempts(self, job: Job) -> list[Attempt]:
        return self.ledger.attempts(job.unit)

    def read_files(self, job: Job, payloads: Mapping[int, bytes]) -> dict[int, bytes | memoryview]:
        """``payloads`` with file references replaced by their files' bytes (``Transport.read_results``;
        those read during ``collect`` already are taken as read)."""
        with self._lock:
            early = self._early.pop(job.unit, {})
        rest = {c: v for c, v in payloads.items() if c not in early}
        return {**self.transport.read_results(job.id, job.unit, rest), **early}

    def delete(self, job: Job) -> int:
        """Drop ``job``'s unit: record, inputs (keys and this host's files), results."""
        self.inbox.untrack(job.unit)
        with self._lock:
            self._early.pop(job.unit, None)
        _, files = self.transport.inputs((job.unit, c) for c in range(job.chunks))
        self.transport.drop(self.redis, [], files)
        return delete_job(self.redis, self.keys, job.unit, job.chunks)

    def close(self) -> None:
        """Stop the listener and drop the reply list."""
        self._closed.set()
        with self._lock:
            self._early.clear()
        if self._listener is not None:
            try:  # wake the listener's BLPOP now rather than at its 1 s timeout
                self.redis.lpush(self.reply_key, WAKE)
            except redis.RedisError:
                pass
            self._listener.join(timeout=5)
            try:
                self.redis.delete(self.reply_key)
            except redis.RedisError:
                pass

    def _do(self, step: Step, client: redis.Redis | None = None) -> Any:
        r = client or self.redis
        if isinstance(step, Mget):
            return r.mget(step.keys)
        if isinstance(step, Exists):
            return r.exists(step.key)
        if isinstance(step, Blpop):
            return r.blpop([step.key], timeout=step.timeout_s)
        if isinstance(step, Lpop):
            return r.lpop(step.key, step.count)
        signal = self.inbox.signal(step.unit) if step.unit is not None else None
        if isinstance(signal, threading.Event):
            signal.wait(step.seconds)
            signal.clear()
        else:
            time.sleep(step.seconds)
        return None

    def _drain(self) -> None:
        conn = connect(self._url)
        try:
            run(listen_steps(self.inbox, self.reply_key, self._closed.is_set), lambda s: self._do(s, conn))
        finally:
            conn.close()
