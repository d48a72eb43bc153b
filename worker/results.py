"""Idempotent result writes: the first result stored for a job chunk wins, and only
that write announces itself on the producer's reply list."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import redis

from hetbatch.adapters.errors import AdapterError
from hetbatch.producers.errors import HetbatchError, PayloadError, RemoteError
from hetbatch.producers.protocol.keys import Keys
from hetbatch.producers.protocol.scripts import script
from hetbatch.producers.protocol.wire import (
    Item,
    Notice,
    TaskEnvelope,
    encode_error,
    encode_notice,
    encode_pack_result,
    encode_results,
)

__all__ = ["Done", "Outcome", "ResultWriter", "library_error", "outcomes_of"]


@dataclass(frozen=True)
class Outcome:
    """The encoded result of one job chunk."""

    job_id: str
    chunk: int
    result: bytes | memoryview


@dataclass
class Done:
    """Items of a task that finished together: a run's outputs (``table`` holds every
    item's rows, in order) or one item's ``error``. ``offset`` is the first item's row
    in the task payload."""

    offset: int
    items: list[Item]
    table: pa.Table | None = None
    error: RemoteError | None = None


def library_error(exc: BaseException, fallback: type[Exception] = PayloadError) -> BaseException:
    """``exc`` as one of the library's errors, for a job's stored error result: hetbatch's
    and the adapters' own pass as they are; a storage or OS error (a Redis
    ``ResponseError`` such as WRONGTYPE, an ``OSError``) becomes ``PayloadError`` (the
    job's data could not be used), anything else ``fallback``; either names the original
    type. So a client sees one of the library's ``remote_type`` names, never a storage,
    OS or framework class."""
    if isinstance(exc, HetbatchError | AdapterError):
        return exc
    cls = PayloadError if isinstance(exc, redis.RedisError | OSError) else fallback
    wrapped = cls(f"{type(exc).__name__}: {exc}")
    wrapped.__cause__ = exc
    return wrapped


def _too_big(size: int, limit: int) -> RemoteError:
    return RemoteError.from_exception(
        PayloadError(f"result of {size} bytes is over max_result_bytes={limit}; submit smaller chunks (chunk_rows)")
    )


def outcomes_of(env: TaskEnvelope, done: Sequence[Done], max_bytes: int) -> list[Outcome]:
    """What to store for ``done``: one result per item, or for a pack, the pack's one result."""
    ordered = sorted(done, key=lambda d: d.offset)
    if env.pack is not None:
        # The header follows the envelope's item order (an empty item shares its offset with
        # the next one); the runs' tables, by offset, hold the succeeded items' rows in that order.
        got: dict[str, int | RemoteError] = {}
        for d in ordered:
            for item in d.items:
                got[item.job_id] = item.rows if d.table is not None else d.error or RemoteError("Error", "no result")
        header = [got[item.job_id] for item in env.items]
        tables = [d.table for d in ordered if d.table is not None]
        data = encode_pack_result(header, tables)
        if len(data) > max_bytes:
            data = encode_pack_result([_too_big(len(data), max_bytes)] * len(env.items), [])
        return [Outcome(env.pack, 0, data)]
    out = []
    for d in ordered:
        if d.table is None:
            error = encode_error(d.error or RemoteError("Error", "no result"))
            out += [Outcome(item.job_id, item.chunk, error) for item in d.items]
            continue
        slices, start = [], 0
        for item in d.items:
            slices.append((start, item.rows))
            start += item.rows
        for item, data in zip(d.items, encode_results(d.table, slices), strict=True):
            if len(data) > max_bytes:
                data = encode_error(_too_big(len(data), max_bytes))
            out.append(Outcome(item.job_id, item.chunk, data))
    return out


class ResultWriter:
    """Stores job chunks' results, first write wins, and announces each new one on its reply list.

    Args:
        client: the Redis holding results.
        keys: the deployment's key names.
        ttl_s: how long stored results (and reply lists) live.
        inline_bytes: results up to this size also ride in the reply notice.
    """

    def __init__(self, client: redis.Redis, keys: Keys, *, ttl_s: int, inline_bytes: int) -> None:
        self._client = client
        self._script = script(client, "results_store")
        self._keys = keys
        self._ttl_ms = ttl_s * 1000
        self._inline = inline_bytes
        self._ledger = keys.ledger()

    def write(self, outcomes: Sequence[Outcome], reply_to: str | None, finished: str | None = None) -> int:
        """Store each outcome unless one is stored already; returns how many were new.

        ``finished``: the id of a task that has now a result for every item; it leaves the
        ledger's list of tasks to watch in the same round trip (the reconciler would only
        find it done later, at a cost). An outcome whose job has a tombstone
        (``Keys.gone``: deleted or purged while it ran) is dropped.
        """
        keys, args = self._call(outcomes, reply_to, finished)
        return int(self._script(keys=keys, args=args))

    def write_many(self, writes: Sequence[tuple[Sequence[Outcome], str | None, str | None]]) -> list[int]:
        """``write`` for several tasks' ``(outcomes, reply_to, finished)`` in one round trip."""
        if len(writes) == 1:  # a pipeline would add a SCRIPT EXISTS round trip
            return [self.write(*writes[0])]
        pipe = self._client.pipeline(transaction=False)
        for outcomes, reply_to, finished in writes:
            keys, args = self._call(outcomes, reply_to, finished)
            self._script(keys=keys, args=args, client=pipe)
        return [int(n) for n in pipe.execute()]

    def _call(
        self, outcomes: Sequence[Outcome], reply_to: str | None, finished: str | None
    ) -> tuple[list[str], list[bytes | memoryview | str | int]]:
        args: list[bytes | memoryview | str | int] = [self._ttl_ms, finished or ""]
        for out in outcomes:
            inline = bytes(out.result) if len(out.result) <= self._inline else None
            args += [
                self._keys.result(out.job_id, out.chunk),
                out.result,
                encode_notice(Notice(out.job_id, out.chunk, inline)),
                self._keys.gone(out.job_id),
            ]
        return [reply_to or "", self._ledger if finished else ""], args
