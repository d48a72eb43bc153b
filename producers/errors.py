"""Exceptions raised by the hetbatch client, and the ones that cross the queue.

Tree::

    HetbatchError
    ├── ConfigError            bad settings or model config
    ├── ModelNotFound          no registry entry for the name or name@version
    ├── SchemaMismatch         data does not fit the model's input schema
    ├── PayloadError           Arrow bytes or a task envelope cannot be decoded safely
    │   └── PayloadTooLarge    over max_payload_bytes
    ├── BrokerError            Redis or the broker cannot be reached after retries
    └── JobError               something happened to a submitted job
        ├── JobFailed          the worker returned an error (carries remote type and details)
        ├── JobTimeout         no result within timeout_s
        ├── JobExpired         the deadline passed before the job ran
        ├── JobLost            the job's data is gone (broker lost it, TTL passed)
        └── JobDeleted         the job was deleted (``Job.delete``) or purged (``Client.purge``)

Errors raised on the worker are flattened to ``RemoteError`` (type, message, details)
and stored as the job's result; the client raises them as ``JobFailed``. Nothing is
pickled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BrokerError",
    "ConfigError",
    "HetbatchError",
    "JobDeleted",
    "JobError",
    "JobExpired",
    "JobFailed",
    "JobLost",
    "JobTimeout",
    "ModelNotFound",
    "PayloadError",
    "PayloadTooLarge",
    "RemoteError",
    "SchemaMismatch",
]


class HetbatchError(Exception):
    """Root of every error hetbatch raises on purpose."""

    def details(self) -> dict[str, Any]:
        """Structured fields that travel with the error across the queue."""
        return {}


class ConfigError(HetbatchError):
    """A setting, a model config or an ensemble config is invalid."""


class ModelNotFound(HetbatchError):
    """The registry has no model (or version) by that name."""

    def __init__(self, ref: str, known: list[str] | None = None) -> None:
        hint = f"; registered: {', '.join(sorted(known))}" if known else ""
        super().__init__(
            f"model {ref!r} is not registered{hint}. Register it with "
            f"'hetbatch models register DIR' or check the name with 'hetbatch models list'"
        )
        self.ref = ref

    def details(self) -> dict[str, Any]:
        return {"model": self.ref}


class SchemaMismatch(HetbatchError):
    """Input data does not match what the model expects."""

    def __init__(
        self,
        message: str,
        *,
        column: str | None = None,
        expected: str | None = None,
        received: str | None = None,
    ) -> None:
        parts = [message]
        if column is not None:
            parts.insert(0, f"input {column!r}:")
        if expected is not None or received is not None:
            parts.append(f"(expected {expected}, received {received})")
        super().__init__(" ".join(parts))
        self.column = column
        self.expected = expected
        self.received = received

    def details(self) -> dict[str, Any]:
        return {"column": self.column, "expected": self.expected, "received": self.received}


class PayloadError(HetbatchError):
    """Bytes on the wire (Arrow IPC or a task envelope) are malformed or unsafe."""


class PayloadTooLarge(PayloadError):
    """A payload is larger than max_payload_bytes."""

    def __init__(self, size: int, limit: int, row: int | None = None) -> None:
        if row is None:
            super().__init__(
                f"payload of {size} bytes is over max_payload_bytes={limit}; "
                f"submit smaller chunks (chunk_rows) or raise the limit on both sides"
            )
        else:  # the client cuts jobs by bytes: only a row that alone is too big fails
            super().__init__(
                f"row {row} of the input is {size} bytes ({size / 2**20:.1f} MiB), over "
                f"max_payload_bytes={limit}; a row is never split: shrink it or raise the limit on both sides"
            )
        self.size = size
        self.limit = limit
        self.row = row

    def details(self) -> dict[str, Any]:
        out: dict[str, Any] = {"size": self.size, "limit": self.limit}
        if self.row is not None:
            out["row"] = self.row
        return out


class BrokerError(HetbatchError):
    """Redis could not be reached or refused a command after the retry budget."""


class JobError(HetbatchError):
    """Base for errors about one submitted job."""

    def __init__(self, job_id: str, message: str) -> None:
        super().__init__(f"job {job_id}: {message}")
        self.job_id = job_id


class JobFailed(JobError):
    """The worker reported an error for this job.

    Attributes:
        remote_type: the worker-side error class name, e.g. ``"SchemaMismatch"``.
        remote_message: the worker-side message.
        remote_details: structured fields (column, expected, received, ...).
    """

    def __init__(self, job_id: str, remote: RemoteError) -> None:
        super().__init__(job_id, f"{remote.type}: {remote.message}")
        self.remote_type = remote.type
        self.remote_message = remote.message
        self.remote_details = dict(remote.details)


class JobTimeout(JobError):
    """No result arrived within the timeout."""


class JobExpired(JobError):
    """The job's deadline passed before a worker ran it; the model never saw it."""


class JobLost(JobError):
    """The job's data is gone: the broker lost it or its TTL passed."""


class JobDeleted(JobError):
    """The job was deleted (``Job.delete``) or its model's work purged (``Client.purge``):
    it will never run and nothing of it is left to read."""


@dataclass(frozen=True)
class RemoteError:
    """An error flattened for the wire: never pickled, rebuilt as ``JobFailed``."""

    type: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_exception(cls, exc: BaseException) -> RemoteError:
        details = exc.details() if isinstance(exc, HetbatchError) else {}
        return cls(type(exc).__name__, str(exc) or repr(exc), details)
