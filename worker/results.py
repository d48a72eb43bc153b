"""Idempotent result writes: the first result stored for a job chunk wins, and only
that write announces itself on the producer's reply list. A result over
``max_result_bytes`` is stored in parts under a manifest (``producers.protocol.parts``).
A big result of a chunk whose input came in a shared-memory file goes back in a file of
the same folder, under a file reference (``Transport.place_result``), written from its
rows: never encoded in memory first."""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyarrow as pa
import redis

from hetbatch.adapters.errors import AdapterError
from hetbatch.producers.errors import HetbatchError, PayloadError, RemoteError
from hetbatch.producers.protocol import parts as result_parts
from hetbatch.producers.protocol import shm
from hetbatch.producers.protocol.keys import Keys
from hetbatch.producers.protocol.scripts import script
from hetbatch.producers.protocol.transport import Transport
from hetbatch.producers.protocol.wire import (
    Item,
    Notice,
    TaskEnvelope,
    encode_error,
    encode_notice,
    encode_pack_result,
    encode_results,
)

__all__ = ["STAGE_BYTES", "Done", "Outcome", "Place", "ResultWriter", "library_error", "outcomes_of"]

STAGE_BYTES = 1 << 20
"""A stored value this big goes by a plain SET under a staging key that the store script
renames, not as a script argument: Lua copies an argument twice (storing 307 MB of results
in 19 writes took 1.30 s through the script, 0.74 s staged, as long as plain SETs: medians
of 6 on the 2-core dev VM)."""
_STAGE_TTL_MS = 3_600_000  # renamed in the same round trip; only a dead write leaves one


Place = Callable[[pa.Table, str, int], bytes | None]
"""Writes the result rows of ``(job, chunk)`` to its shared-memory file; the reference to
store, or ``None``: not written (``Transport.place_result``)."""


@dataclass(frozen=True)
class Outcome:
    """The stored result of one job chunk: the result itself, or the manifest of ``parts``,
    or the reference to the shared-memory ``file`` that holds it."""

    job_id: str
    chunk: int
    result: bytes | memoryview
    parts: tuple[memoryview, ...] = ()
    file: str | None = None


def _outcome(job_id: str, chunk: int, data: bytes | memoryview, max_bytes: int) -> Outcome:
    """``data`` as stored: whole, or over ``max_bytes`` as a manifest and its parts."""
    if len(data) <= max_bytes:
        return Outcome(job_id, chunk, data)
    part_bytes = min(max_bytes, result_parts.MAX_PART_BYTES)
    if -(-len(data) // part_bytes) > result_parts.MAX_PARTS:  # a reader would refuse the manifest
        error = PayloadError(
            f"job {job_id} chunk {chunk}: result of {len(data)} bytes needs over {result_parts.MAX_PARTS} parts "
            f"of max_result_bytes={max_bytes}; raise max_result_bytes or submit smaller chunks (chunk_rows)"
        )
        return Outcome(job_id, chunk, encode_error(RemoteError.from_exception(error)))
    manifest, parts = result_parts.split(data, part_bytes)
    return Outcome(job_id, chunk, manifest, tuple(parts))


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


def outcomes_of(env: TaskEnvelope, done: Sequence[Done], max_bytes: int, place: Place | None = None) -> list[Outcome]:
    """What to store for ``done``: one result per item, or for a pack, the pack's one result;
    one over ``max_bytes`` goes in parts of at most ``max_bytes``. With ``place``, a job's
    result (not a pack's, whose status reads its header, nor an ensemble member's, which
    fusion reads) may go to a shared-memory file when its input came in one."""
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
        return [_outcome(env.pack, 0, encode_pack_result(header, tables), max_bytes)]
    out = []
    for d in ordered:
        if d.table is None:
            error = encode_error(d.error or RemoteError("Error", "no result"))
            out += [Outcome(item.job_id, item.chunk, error) for item in d.items]
            continue
        starts = list(itertools.accumulate((item.rows for item in d.items), initial=0))
        to_file = env.payload_shm is not None and env.then is None
        refs = [
            place(d.table.slice(start, item.rows), item.job_id, item.chunk) if place and to_file else None
            for start, item in zip(starts, d.items)
        ]
        rest = [(start, item.rows) for start, item, ref in zip(starts, d.items, refs) if ref is None]
        encoded = iter(encode_results(d.table, rest) if rest else [])
        for item, ref in zip(d.items, refs, strict=True):
            if ref is None:
                out.append(_outcome(item.job_id, item.chunk, next(encoded), max_bytes))
            else:
                out.append(Outcome(item.job_id, item.chunk, ref, file=shm.result_name(item.job_id, item.chunk)))
    return out


class ResultWriter:
    """Stores job chunks' results, first write wins, and announces each new one on its reply list.

    Args:
        client: the Redis holding results.
        keys: the deployment's key names.
        ttl_s: how long stored results (and reply lists) live.
        inline_bytes: results up to this size also ride in the reply notice.
        transport: writes results to shared-memory files (``place``) and deletes those of
            results not stored (``Outcome.file``); none: never.
    """

    def __init__(
        self, client: redis.Redis, keys: Keys, *, ttl_s: int, inline_bytes: int, transport: Transport | None = None
    ) -> None:
        self._client = client
        self._transport = transport
        self._script = script(client, "results_store")
        self._keys = keys
        self._ttl_ms = ttl_s * 1000
        self._inline = inline_bytes
        self._ledger = keys.ledger()

    def write(self, outcomes: Sequence[Outcome], reply_to: str | None, finished: str | None = None) -> int:
        """Store each outcome (with its parts) unless one is stored already; returns how many were new.

        ``finished``: the id of a task that has now a result for every item; it leaves the
        ledger's list of tasks to watch in the same round trip (the reconciler would only
        find it done later, at a cost). An outcome whose job has a tombstone
        (``Keys.gone``: deleted or purged while it ran) is dropped.
        """
        return self.write_many([(outcomes, reply_to, finished)])[0]

    def write_many(self, writes: Sequence[tuple[Sequence[Outcome], str | None, str | None]]) -> list[int]:
        """``write`` for several tasks' ``(outcomes, reply_to, finished)`` in one round trip
        (with the staging SETs of their big values, ``STAGE_BYTES``)."""
        calls = [self._call(outcomes, reply_to, finished) for outcomes, reply_to, finished in writes]
        # A write that fails leaves its files: the script may have run before the reply
        # was lost, so a reference may name them (the sweep takes them otherwise).
        done = self._run(calls)
        for (outcomes, _, _), stored in zip(writes, done, strict=True):
            # Not stored (another execution's result was, or the job is gone): no reader
            # will come. Of a task stored in part, which file is whose is not known: the sweep takes them.
            files = [out.file for out in outcomes if out.file]
            if stored == 0 and files and self._transport is not None:
                self._transport.drop(self._client, [], files)
        return done

    def place(self, table: pa.Table, job_id: str, chunk: int) -> bytes | None:
        """``Place``: a result's rows to its shared-memory file (none without a transport)."""
        return None if self._transport is None else self._transport.place_result(table, job_id, chunk)

    def _run(
        self,
        calls: Sequence[tuple[list[str], list[bytes | memoryview | str | int], list[tuple[str, bytes | memoryview]]]],
    ) -> list[int]:
        if len(calls) == 1 and not calls[0][2]:  # a pipeline would add a SCRIPT EXISTS round trip
            keys, args, _ = calls[0]
            return [int(self._script(keys=keys, args=args))]
        pipe = self._client.pipeline(transaction=False)
        for keys, args, staged in calls:
            for key, value in staged:
                pipe.set(key, value, px=_STAGE_TTL_MS)
            self._script(keys=keys, args=args, client=pipe)
        replies = pipe.execute()
        done, at = [], 0
        for _, _, staged in calls:
            at += len(staged)
            done.append(int(replies[at]))
            at += 1
        return done

    def _call(
        self, outcomes: Sequence[Outcome], reply_to: str | None, finished: str | None
    ) -> tuple[list[str], list[bytes | memoryview | str | int], list[tuple[str, bytes | memoryview]]]:
        args: list[bytes | memoryview | str | int] = [self._ttl_ms, finished or ""]
        staged: list[tuple[str, bytes | memoryview]] = []
        write = secrets.token_hex(8)

        def value(out: Outcome, key: str, data: bytes | memoryview) -> list[bytes | memoryview | str | int]:
            if len(data) < STAGE_BYTES:
                return [key, "", data]
            stage = self._keys.result_stage(out.job_id, out.chunk, f"{write}.{len(staged)}")
            staged.append((stage, data))
            return [key, stage, ""]

        for out in outcomes:
            inline = bytes(out.result) if len(out.result) <= self._inline else None
            args += value(out, self._keys.result(out.job_id, out.chunk), out.result)
            args += [encode_notice(Notice(out.job_id, out.chunk, inline)), self._keys.gone(out.job_id), len(out.parts)]
            for i, part in enumerate(out.parts):
                args += value(out, self._keys.result_part(out.job_id, out.chunk, i), part)
        return [reply_to or "", self._ledger if finished else ""], args, staged
