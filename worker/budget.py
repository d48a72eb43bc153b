"""An in-flight byte budget: what bounds a worker's memory, whatever its thread count.

Each task holds its input payload, the decoded arrays, the model's outputs and their
encoded result at once: about three to four times the larger of its input and output
bytes. Thirty-two task threads on chunks of 32 MiB of output (a 1.1 GB-output job)
peaked at 2.8 GB RSS. So a task waits before it reads its payload until the bytes of
the tasks in flight leave room for its own (``task_bytes``); small tasks never wait for
each other (hundreds fit), and a task larger than the whole budget runs alone rather
than never. A model's rows per call shrink the same way after an out-of-memory error
(``CallSize``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from hetbatch.producers.protocol.model import ModelSpec

__all__ = ["ByteBudget", "CallSize", "task_bytes"]

_STRING_BYTES = 64
"""A guess for a string's bytes (its size is known only once read)."""
_RAGGED_ELEMENTS = 256
"""A guess for a variable-length row's elements where no ``max_length`` is declared."""


def task_bytes(spec: ModelSpec, rows: int) -> int:
    """Bytes a task of ``rows`` rows of ``spec`` holds: the larger of its input (exact for
    fixed shapes, a guess for strings and variable-length rows) and its outputs (as
    measured at registration), rows times per row."""
    per_row = 0
    for t in spec.inputs:
        element = _STRING_BYTES if t.dtype == "string" else int(np.dtype(t.dtype).itemsize)
        per_row += element * t.size * ((t.max_length or _RAGGED_ELEMENTS) if t.ragged else 1)
    return rows * max(per_row, spec.output_bytes, 1)


class ByteBudget:
    """Admits tasks while their bytes fit ``limit_bytes`` (a counting semaphore on bytes).

    Args:
        limit_bytes: most bytes in flight; 0 or less means no limit.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._used = 0
        self._peak = 0
        self._tickets = self._serving = 0
        self._changed = threading.Condition()

    def _fits(self, nbytes: int) -> bool:
        return self.limit_bytes <= 0 or self._used == 0 or self._used + nbytes <= self.limit_bytes

    @property
    def used(self) -> int:
        """Bytes held now."""
        return self._used

    def take_peak(self) -> int:
        """Most bytes held at once since the last call (then reset to what is held now)."""
        with self._changed:
            peak, self._peak = self._peak, self._used
        return peak

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        """Hold ``nbytes`` for the block, waiting until they fit (or nothing else is held).

        Never call it again on the same thread inside the block: the inner call could
        wait for the outer one's bytes.
        """
        nbytes = max(0, nbytes)
        with self._changed:
            # Admitted in arrival order: a stream of small tasks cannot starve a big one.
            ticket, self._tickets = self._tickets, self._tickets + 1
            self._changed.wait_for(lambda: ticket == self._serving and self._fits(nbytes))
            self._serving += 1
            self._used += nbytes
            self._peak = max(self._peak, self._used)
            self._changed.notify_all()  # the next ticket may fit too
        try:
            yield
        finally:
            with self._changed:
                self._used -= nbytes
                self._changed.notify_all()


class CallSize:
    """The rows per model call a model can take, learned from its out-of-memory errors.

    Starts at ``limit``. An OOM at ``rows`` sets it to half of them, and it stays there:
    memory use depends on the rows, so the next job of the same size would meet the same
    OOM. After ``probe_after`` clean calls that used the whole learned size, it doubles
    (up to ``limit``) to try again: the OOM may have come from memory that another model
    held for a while. A probe that fails doubles the clean calls the next probe waits for.
    """

    def __init__(self, limit: int, probe_after: int = 1000) -> None:
        self.limit = max(1, limit)
        self.rows = self.limit
        self.probe_after = probe_after
        self._clean = 0
        self._probing = False
        self._lock = threading.Lock()

    def out_of_memory(self, rows: int) -> int:
        """Record an OOM on a call of ``rows`` rows; returns the new (smaller) size."""
        with self._lock:
            self.rows = max(1, min(self.rows, rows) // 2)
            if self._probing:
                self.probe_after *= 2
            self._clean, self._probing = 0, False
            return self.rows

    def succeeded(self, rows: int) -> None:
        """Record a clean call of ``rows`` rows (only full-size calls count towards a probe)."""
        with self._lock:
            if rows < self.rows or self.rows >= self.limit:
                return
            self._probing = False
            self._clean += 1
            if self._clean >= self.probe_after:
                self.rows, self._clean, self._probing = min(self.limit, self.rows * 2), 0, True
