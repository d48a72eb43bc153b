"""Dynamic batching: pure merge/split, and a thin accumulator thread per model.

Requests for the same model that arrive within ``max_delay_ms`` of the first are
merged into one call of at most ``max_batch_rows`` rows (a larger request is cut).
Outputs are split back by row ranges; each output must have exactly as many rows as
the call's input. A request's outputs come back as ``Pieces``, one per model call that
served it, never joined here: a caller that writes them out (an Arrow stream, one record
batch each) saves a copy of every output row. A failing merged call is bisected, so
only the request that makes the model raise fails. An out-of-memory error halves the
rows per call and retries; the halved size is kept for the model's later calls (an
identical job does not pay the same chain of OOMs again), and doubled back only after
many clean calls at the learned size.
A sticky device error is handed to ``on_fatal`` (the worker exits; its jobs are redelivered).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from hetbatch.adapters.errors import DeviceFailed, PredictError, is_oom
from hetbatch.producers.protocol import tracing
from hetbatch.worker.budget import CallSize

__all__ = [
    "Arrays",
    "Arrivals",
    "BatchStats",
    "Batcher",
    "Pieces",
    "Request",
    "join",
    "merge",
    "split",
]

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
Pieces = list[Arrays]
"""A request's outputs: consecutive row ranges of it, in order (views of model calls' outputs)."""


@dataclass
class Request:
    """Rows of one job item waiting for a model call."""

    inputs: Mapping[str, np.ndarray]
    rows: int
    future: Future[Pieces] = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    trace: str | None = None  # the job's traceparent: the model call's span links it


@dataclass(frozen=True)
class BatchStats:
    """What one model call looked like, for metrics."""

    rows: int
    requests: int
    queue_wait_s: float
    compute_s: float
    busy_s: float = 0.0
    """Time some call of this model ran, accrued since the previous batch's stats (with
    several instances, calls overlap: the sum of compute_s counts that time twice)."""
    padded_fraction: float | None = None
    """For a model with ragged inputs: padded elements / all elements its calls got."""


class Arrivals:
    """Counts tasks per model that are decoding and will submit soon.

    The batcher waits ``max_delay_ms`` for more rows only while some are on their way:
    a lone request runs at once (low latency at low load), a burst still coalesces.
    """

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def enter(self, key: str) -> None:
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1

    def leave(self, key: str) -> None:
        with self._lock:
            self._counts[key] -= 1

    def count(self, key: str) -> int:
        return self._counts.get(key, 0)


# A call of this much input has amortized the per-call cost: merging more requests into it
# would copy them (about 3 ms per 16 MiB) to save far less (a call's overhead is ~0.1 ms).
MERGE_BYTES = 16 << 20


def _nbytes(req: Request) -> int:
    return sum(a.nbytes for a in req.inputs.values())


def merge(requests: Sequence[Request]) -> tuple[Arrays, list[slice]]:
    """Concatenate the requests' inputs; one request passes through without a copy."""
    slices, start = [], 0
    for req in requests:
        slices.append(slice(start, start + req.rows))
        start += req.rows
    if len(requests) == 1:
        return dict(requests[0].inputs), slices
    names = list(requests[0].inputs)
    return {n: np.concatenate([r.inputs[n] for r in requests]) for n in names}, slices


def split(outputs: Mapping[str, np.ndarray], slices: Sequence[slice]) -> list[Arrays]:
    """Cut merged outputs back into per-request outputs (views, no copy).

    Raises:
        PredictError: an output's length differs from the merged input's.
    """
    rows = slices[-1].stop if slices else 0
    for name, arr in outputs.items():
        if np.ndim(arr) == 0 or len(arr) != rows:
            raise PredictError(f"output {name!r} has {np.shape(arr)[:1]} rows for {rows} input rows")
    return [{n: a[s] for n, a in outputs.items()} for s in slices]


def join(pieces: Pieces) -> Arrays:
    """A request's outputs as one array each (a copy, unless it came in one piece)."""
    if len(pieces) == 1:
        return pieces[0]
    return {n: np.concatenate([p[n] for p in pieces]) for n in pieces[0]}


def _cut(calls: Sequence[tuple[int, Arrays]], slices: Sequence[slice]) -> list[Pieces]:
    """Each request's ``slices`` of a merged batch's outputs, from ``calls`` (rows, outputs)
    of the model calls that ran it in order: views, no copy."""
    bounds, at = [], 0
    for rows, outputs in calls:
        bounds.append((at, at + rows, outputs))
        at += rows
    out = []
    for s in slices:
        mine = [
            {n: a[max(s.start, lo) - lo : min(s.stop, hi) - lo] for n, a in outputs.items()}
            for lo, hi, outputs in bounds
            if lo < s.stop and s.start < hi
        ]
        out.append(mine or [{n: a[:0] for n, a in calls[0][1].items()}])
    return out


class Batcher:
    """Coalesces requests for one model and runs them on ``instances`` threads.

    Args:
        predict: the model call (named arrays in, named arrays out).
        max_batch_rows: most rows per model call.
        max_delay_ms: longest wait for more requests after the first.
        on_batch: called after every model call with its stats.
        incoming: how many requests are on their way (None: always wait max_delay_ms).
        instances: model calls that may run at once (like Triton's instance count): on a
            CPU, two single-threaded calls keep both cores busy where one two-threaded call
            stalls whenever another process takes one of its cores.
        merge: coalesce requests (off for a model whose rows affect each other's outputs).
        padded: the padded fraction of the model calls this thread made since it last
            asked (``worker.ragged.RaggedCall.take_padded_fraction``), for the stats.
        on_fatal: called with a ``DeviceFailed`` error (the device is unusable for this
            process); the failing requests are left unanswered (expected not to return).
    """

    def __init__(
        self,
        predict: Callable[[Mapping[str, np.ndarray]], Arrays],
        *,
        max_batch_rows: int,
        max_delay_ms: float,
        name: str = "model",
        on_batch: Callable[[BatchStats], None] | None = None,
        incoming: Callable[[], int] | None = None,
        instances: int = 1,
        merge: bool = True,
        padded: Callable[[], float | None] | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._predict = predict
        self._padded = padded
        self.max_batch_rows = max(1, max_batch_rows)
        self.call_size = CallSize(self.max_batch_rows)
        self._on_fatal = on_fatal
        self.max_delay_s = max(0.0, max_delay_ms) / 1000.0
        self.name = name
        self._on_batch = on_batch
        self._incoming = incoming
        self.merges = merge
        self._queue: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self._held: Request | None = None
        # Held during every model call: a request that finds an instance free, with nothing
        # queued or on its way, runs on the caller's thread (no hand-off: low latency).
        self._busy = threading.Semaphore(max(1, instances))
        self._gathering = threading.Lock()  # one thread gathers the next batch at a time
        self._clock = threading.Lock()
        self._running, self._busy_since, self._busy_s = 0, 0.0, 0.0
        self._threads = [
            threading.Thread(target=self._loop, name=f"batcher-{name}-{i}", daemon=True)
            for i in range(max(1, instances))
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, inputs: Mapping[str, np.ndarray], rows: int, trace: str | None = None) -> Future[Pieces]:
        """Queue ``rows`` rows for a model call; ``trace``: the job's ``traceparent``."""
        if rows > self.max_batch_rows and len(self._threads) > 1:
            return self._submit_pieces(inputs, rows, trace)
        req = Request(inputs, rows, trace=trace)
        if self._idle() and self._busy.acquire(blocking=False):
            try:
                if self._idle():
                    self._run([req])
                    return req.future
            finally:
                self._busy.release()
        self._queue.put(req)
        return req.future

    def _submit_pieces(self, inputs: Mapping[str, np.ndarray], rows: int, trace: str | None) -> Future[Pieces]:
        """Queue a big request in pieces of max_batch_rows, so every instance takes some."""
        step = self.max_batch_rows
        pieces = [
            Request({n: a[start : start + step] for n, a in inputs.items()}, min(step, rows - start), trace=trace)
            for start in range(0, rows, step)
        ]
        whole: Future[Pieces] = Future()
        left, lock = [len(pieces)], threading.Lock()

        def finished(_: Future[Pieces]) -> None:
            with lock:
                left[0] -= 1
                if left[0]:
                    return
            failed = next(filter(None, (p.future.exception() for p in pieces)), None)
            if failed is not None:
                whole.set_exception(failed)
            else:
                whole.set_result([out for p in pieces for out in p.future.result()])

        for piece in pieces:
            piece.future.add_done_callback(finished)
            self._queue.put(piece)
        return whole

    def _idle(self) -> bool:
        incoming = self._incoming() if self._incoming is not None else 1
        return incoming == 0 and self._queue.empty() and self._held is None

    def close(self) -> None:
        self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=5)

    def _next(self, timeout: float | None) -> Request | None:
        if self._held is not None:
            req, self._held = self._held, None
            return req
        return self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()

    def _gather(self) -> list[Request] | None:
        first = self._next(None)
        if first is None:
            self._queue.put(None)  # for the other instances
            return None
        batch, rows = [first], first.rows
        if not self.merges:
            return batch
        deadline = time.monotonic() + self.max_delay_s
        size = _nbytes(first)
        while rows < self.max_batch_rows and size < MERGE_BYTES:
            if self._idle():
                break  # nothing else is on its way: waiting would only add latency
            try:
                req = self._next(deadline - time.monotonic())
            except queue.Empty:
                break
            if req is None:
                self._queue.put(None)
                break
            if rows + req.rows > self.max_batch_rows:
                self._held = req  # starts the next batch
                break
            batch.append(req)
            rows += req.rows
            size += _nbytes(req)
        return batch

    def _loop(self) -> None:
        while True:
            with self._gathering:
                batch = self._gather()
            if batch is None:
                return
            with self._busy:
                self._run(batch)

    def _tick(self, delta: int, report: bool = False) -> float:
        """Count a call in (+1) or out (-1); with ``report``, returns (and forgets) the busy
        time accrued since the last report."""
        with self._clock:
            now = time.monotonic()
            if self._running == 0:
                self._busy_since = now
            self._running += delta
            if self._running == 0:
                self._busy_s += now - self._busy_since
                self._busy_since = now
            if not report:
                return 0.0
            busy, self._busy_s = self._busy_s, 0.0
            return busy

    def _run(self, batch: list[Request]) -> None:
        started = time.monotonic()
        self._tick(+1)
        try:
            merged, slices = merge(batch)
            # One span per model call, linked to every job whose rows it merged.
            with tracing.batch_span("hetbatch.predict", (r.trace for r in batch), {"hetbatch.requests": len(batch)}):
                outputs = _cut(self._call(merged, slices[-1].stop), slices)
        except Exception as exc:
            self._tick(-1)
            if isinstance(exc, DeviceFailed) and self._on_fatal is not None:
                self._on_fatal(exc)  # the worker exits: these requests' jobs are redelivered
                return
            if len(batch) > 1:
                mid = len(batch) // 2
                log.info("batch of %d requests for %s failed (%s); bisecting", len(batch), self.name, exc)
                self._run(batch[:mid])
                self._run(batch[mid:])
            else:
                batch[0].future.set_exception(exc)
            return
        compute, busy = time.monotonic() - started, self._tick(-1, report=True)
        for req, out in zip(batch, outputs):
            req.future.set_result(out)
        if self._on_batch is not None:
            wait = started - min(r.enqueued for r in batch)
            padded = self._padded() if self._padded is not None else None
            self._on_batch(BatchStats(slices[-1].stop, len(batch), wait, compute, busy, padded))

    def _call(self, merged: Mapping[str, np.ndarray], rows: int) -> list[tuple[int, Arrays]]:
        """Run the model in pieces of the learned call size, halving it on OOM (and keeping
        it); each call's rows and outputs."""
        start, parts = 0, []
        while start < rows:
            step = self.call_size.rows
            n = min(step, rows - start)
            piece = merged if (start == 0 and rows <= step) else {k: a[start : start + n] for k, a in merged.items()}
            try:
                out = self._predict(piece)
            except Exception as exc:
                if not is_oom(exc) or n == 1:
                    raise
                smaller = self.call_size.out_of_memory(n)
                log.warning("%s ran out of memory on %d rows; %d rows per call from now on", self.name, n, smaller)
                continue
            self.call_size.succeeded(n)
            parts.append((n, split(out, [slice(0, n)])[0]))
            start += n
        return parts
