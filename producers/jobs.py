"""Jobs: a submitted job's handle, and reading its stored result (one chunk, many, or a pack's)."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Protocol

import pyarrow as pa

from hetbatch.producers.errors import JobDeleted, JobExpired, JobFailed, JobLost, RemoteError
from hetbatch.producers.protocol.ledger import Attempt
from hetbatch.producers.protocol.schema import unwrap_tensors
from hetbatch.producers.protocol.wire import DEVICE_KEY, Status, decode_pack_result, decode_result, pack_header

__all__ = ["FINISHED", "Job", "JobHandle", "Pack", "assemble", "outputs", "refuse_deleted", "status_of"]

FINISHED = frozenset({Status.DONE, Status.FAILED, Status.EXPIRED, Status.LOST})
"""The statuses a job never leaves: ``done()`` is true for each (a LOST job will never run)."""


def assemble(job_id: str, chunks: int, parts: Mapping[int, bytes | memoryview]) -> pa.Table:
    """A job's table from its stored chunk results, in order.

    Raises:
        JobFailed: a worker reported an error for a chunk (first failing chunk).
        JobExpired: the deadline passed before it ran.
    """
    tables = []
    for chunk in range(chunks):
        decoded = decode_result(parts[chunk])
        if isinstance(decoded, RemoteError):
            if decoded.type == "JobExpired":
                raise JobExpired(job_id, decoded.message)
            raise JobFailed(job_id if chunks == 1 else f"{job_id} chunk {chunk}", decoded)
        tables.append(decoded)
    table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
    devices = {(t.schema.metadata or {}).get(DEVICE_KEY) for t in tables} - {None}
    if len(devices) > 1:  # concat keeps the first chunk's metadata: say every device that ran it
        meta = {**(table.schema.metadata or {}), DEVICE_KEY: b",".join(sorted(d for d in devices if d))}
        table = table.replace_schema_metadata(meta)
    return unwrap_tensors(table)


def status_of(stored: Sequence[bytes | None], recorded: bool, index: int | None = None) -> Status:
    """A job's status from its chunks' stored results and whether its record exists;
    ``index``: the job's place in its pack (the one stored result is the pack's)."""
    if any(v is None for v in stored):
        return Status.PENDING if recorded else Status.LOST
    for value in stored:
        if index is not None and value is not None and value[:1] == b"P":
            got = pack_header(value)[index]
            if isinstance(got, RemoteError):
                return Status.EXPIRED if got.type == "JobExpired" else Status.FAILED
            continue
        if value is not None and value[:1] == b"E":
            decoded = decode_result(value)
            assert isinstance(decoded, RemoteError)
            return Status.EXPIRED if decoded.type == "JobExpired" else Status.FAILED
    return Status.DONE


class Pack:
    """The jobs of one ``submit_many`` task share one stored result: read and decoded once."""

    def __init__(self, pack_id: str) -> None:
        self.id = pack_id
        self._results: list[pa.Table | RemoteError] | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._results is not None

    def table(self, job_id: str, index: int, data: bytes | None) -> pa.Table:
        """Job ``index``'s outputs (decoding ``data``, the pack's stored result, on first use).

        Raises:
            JobFailed, JobExpired: as ``Job.result``.
            JobLost: the pack's result is gone before it was first read.
        """
        with self._lock:
            if self._results is None:
                if data is None:
                    raise JobLost(job_id, f"the result of its pack {self.id} is gone")
                self._results = decode_pack_result(data)
            got = self._results[index]
        if isinstance(got, RemoteError):
            if got.type == "JobExpired":
                raise JobExpired(job_id, got.message)
            raise JobFailed(job_id, got)
        return unwrap_tensors(got)


class JobHandle(Protocol):
    """What a ``Job`` asks of its client's replies (``producers.replies.Replies``)."""

    def collect(self, job: Job, timeout_s: float | None) -> dict[int, bytes]: ...

    def status(self, job: Job) -> Status: ...

    def attempts(self, job: Job) -> list[Attempt]: ...

    def delete(self, job: Job) -> int: ...

    def read_files(self, job: Job, payloads: Mapping[int, bytes]) -> dict[int, bytes | memoryview]:
        """``payloads`` with file references replaced by their shared-memory files' bytes."""
        ...


def outputs(job: Job, payloads: Mapping[int, bytes] | None) -> pa.Table:
    """``job``'s outputs from its unit's stored results (``None``: its pack is read already);
    results in shared-memory files are read (once: each file is deleted when read).

    Raises:
        JobFailed, JobExpired, JobLost: as ``Job.result``.
        PayloadError: a result file is not what its reference says.
    """
    if job.pack is None:
        assert payloads is not None
        return assemble(job.id, job.chunks, job.replies.read_files(job, payloads))
    return job.pack.table(job.id, job.index, None if payloads is None else payloads.get(0))


def refuse_deleted(job: Job) -> None:
    """Raise ``JobDeleted`` for a job this process deleted (``Job.delete``).

    Raises:
        JobDeleted: ``job`` was deleted: nothing of it is left to read.
    """
    if job.deleted:
        raise JobDeleted(job.id, "it was deleted (Job.delete); its results are gone")


class Job:
    """A submitted job; ``result()`` waits for all its chunks and reassembles them.

    A job of ``submit_many`` is item ``index`` of a ``pack``: its result is stored with
    the pack's other jobs, under the pack's id (its ``unit``).
    """

    def __init__(
        self,
        replies: JobHandle,
        job_id: str,
        model: str,
        chunks: int,
        rows: int,
        pack: Pack | None = None,
        index: int = 0,
    ) -> None:
        self.id = job_id
        self.model = model
        self.chunks = chunks
        self.rows = rows
        self.pack = pack
        self.index = index
        self.unit = pack.id if pack is not None else job_id
        self.replies = replies
        self.deleted = False

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, model={self.model!r}, chunks={self.chunks}, rows={self.rows})"

    def result(self, timeout_s: float | None = 300.0) -> pa.Table:
        """Wait for the job and return its outputs, one column per model output, rows in order.

        Raises:
            JobFailed: a worker reported an error for a chunk (first failing chunk).
            JobExpired: the deadline passed before it ran.
            JobDeleted: the job was deleted or purged.
            JobLost: the job's record or result vanished from Redis: no worker will answer;
                or its result was in a shared-memory file that is gone (each is read once).
            JobTimeout: not finished within ``timeout_s``.
            PayloadError: its result file in shared memory is not what was stored.
        """
        refuse_deleted(self)
        loaded = self.pack is not None and self.pack.loaded
        return outputs(self, None if loaded else self.replies.collect(self, timeout_s))

    def status(self) -> Status:
        """Where the job stands, read from Redis (no waiting)."""
        return self.replies.status(self)

    def done(self) -> bool:
        """Whether the job finished for good: done, failed, expired or lost."""
        return self.status() in FINISHED

    def attempts(self) -> list[Attempt]:
        """Every start of this job's chunks by a worker (worker, time, attempt number), oldest first."""
        return self.replies.attempts(self)

    def delete(self) -> int:
        """End the job for good: every key it owns in Redis goes now, and a chunk still
        queued or running is never run or answered; returns keys deleted.

        A job of ``submit_many`` shares them with its pack: this drops the pack's (read
        the other jobs' results first; a result read before stays readable). Reading the
        job afterwards raises ``JobDeleted``.
        """
        self.deleted = True
        return self.replies.delete(self)
