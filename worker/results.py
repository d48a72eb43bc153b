"""Idempotent result writes: the first result stored for a job chunk wins, and only
that write announces itself on the producer's reply list. A result over
``max_result_bytes`` is stored in parts under a manifest (``producers.protocol.parts``).
A big result of a chunk whose input came in a shared-memory file goes back in a file of
the same folder, under a file reference (``Transport.place_result``)."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
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

__all__ = ["STAGE_BYTES", "Done", "Outcome", "ResultWriter", "library_error", "outcomes_of"]

STAGE_BYTES = 1 << 20
"""A stored value this big goes by a plain SET under a staging key that the store script
renames, not as a script argument: Lua copies an argument twice (storing 307 MB of results
in 19 writes took 1.30 s through the script, 0.74 s staged, as long as plain SETs: medians
of 6 on the 2-core dev VM)."""
_STAGE_TTL_MS = 3_600_000  # renamed in the same round trip; only a dead write leaves one


@dataclass(frozen=True)
class Outcome:
    """The encoded result of one job chunk: the result itself, or the manifest of ``parts``.
    ``whole``: the encoded result, when it may go to a shared-memory file instead."""

    job_id: str
    chunk: int
    result: bytes | memoryview
    parts: tuple[memoryview, ...] = ()
    whole: bytes | memoryview | None = None


def _outcome(job_id: str, chunk: int, data: bytes | memoryview, max_bytes: int, to_file: bool = False) -> Outcome:
    """``data`` as stored: whole, or over ``max_bytes`` as a manifest and its parts (and,
    ``to_file``, kept whole for a shared-memory file)."""
    whole = data if to_file else None
    if len(data) <= max_bytes:
        return Outcome(job_id, chunk, data, whole=whole)
    part_bytes = min(max_bytes, result_parts.MAX_PART_BYTES)
    if -(-len(data) // part_bytes) > result_parts.MAX_PARTS:  # a reader would refuse the manifest
        error = PayloadError(
            f"job {job_id} chunk {chunk}: result of {len(data)} bytes needs over {result_parts.MAX_PARTS} parts "
            f"of max_result_bytes={max_bytes}; raise max_result_bytes or submit smaller chunks (chunk_rows)"
        )
        return Outcome(job_id, chunk, encode_error(RemoteError.from_exception(error)))
    manifest, parts = result_parts.split(data, part_bytes)
    return Outcome(job_id, chunk, manifest, tuple(parts), whole)


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


def outcomes_of(env: TaskEnvelope, done: Sequence[Done], max_bytes: int) -> list[Outcome]:
    """What to store for ``done``: one result per item, or for a pack, the pack's one result;
    one over ``max_bytes`` goes in parts of at most ``max_bytes``. A job's result (not a
    pack's, whose status reads its header, nor an ensemble member's, which fusion reads)
    may go to a shared-memory file when its input came in one."""
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
        slices, start = [], 0
        for item in d.items:
            slices.append((start, item.rows))
            start += item.rows
        to_file = env.payload_shm is not None and env.then is None
        for item, data in zip(d.items, encode_results(d.table, slices), strict=True):
            out.append(_outcome(item.job_id, item.chunk, data, max_bytes, to_file))
    return out


class ResultWriter:
    """Stores job chunks' results, first write wins, and announces each new one on its reply list.

    Args:
        client: the Redis holding results.
        keys: the deployment's key names.
        ttl_s: how long stored results (and reply lists) live.
        inline_bytes: results up to this size also ride in the reply notice.
        transport: writes results to shared-memory files (``Outcome.whole``); none: never.
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
        placed = [self._to_files(outcomes) for outcomes, _, _ in writes]
        calls = [
            self._call(outcomes, reply_to, finished)
            for (outcomes, _), (_, reply_to, finished) in zip(placed, writes, strict=True)
        ]
        # A write that fails leaves its files: the script may have run before the reply
        # was lost, so a reference may name them (the sweep takes them otherwise).
        done = self._run(calls)
        for (_, files), stored in zip(placed, done, strict=True):
            # Not stored (another execution's result was, or the job is gone): no reader
            # will come. Of a task stored in part, which file is whose is not known: the sweep takes them.
            if stored == 0:
                self._drop(files)
        return done

    def _drop(self, files: list[str]) -> None:
        if files and self._transport is not None:
            self._transport.drop(self._client, [], files)

    def _to_files(self, outcomes: Sequence[Outcome]) -> tuple[list[Outcome], list[str]]:
        """``outcomes`` with each that may go to a file written there (a file reference in
        its place), and the names of the files written."""
        if self._transport is None or not any(out.whole is not None for out in outcomes):
            return list(outcomes), []
        out, files = [], []
        for outcome in outcomes:
            ref = None
            if outcome.whole is not None:
                ref = self._transport.place_result(outcome.whole, outcome.job_id, outcome.chunk)
            if ref is None:
                out.append(outcome)
                continue
            out.append(Outcome(outcome.job_id, outcome.chunk, ref))
            files.append(str(shm.result_name(outcome.job_id, outcome.chunk)))
        return out, files

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
