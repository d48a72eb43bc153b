"""Payload transport: where a task's input rows travel, and the one place that knows it.

A chunk's Arrow IPC bytes take one of three ways (``TaskEnvelope`` names which):

* **inline**: base64 inside the task message, for payloads up to ``inline_max_bytes``
  (a Redis round trip costs more than the bytes below ~8 KiB);
* **Redis key**: ``Keys.input(job, chunk)``, written in the producer's publishing
  round trip, with a TTL;
* **shared-memory file**: ``shm.payload_name(job, chunk)`` in a folder the producer
  and the worker share (``producers.protocol.shm``), for big jobs on one host.

On the way out ``Transport.place`` chooses; on the way in ``Transport.read`` reads;
once the result is stored, or the job is deleted or purged, ``Transport.drop`` deletes.

Results take the way back: a big result of a chunk whose input came in a file goes to
``shm.result_name(job, chunk)`` in the same folder (``Transport.place_result``, on the
worker) under a reference (``parts.file_ref``), and the client reads it once and deletes
it (``Transport.read_results``), as soon as the reference comes: ``Client`` copies one
chunk's result out while the worker still runs the next (``replies.Replies``). A deleted
or purged job's result files go with its input files (``Transport.inputs`` names both).

Names are derived, never trusted: the key or file an envelope names must equal the one
derived from the job id of its first unit (and this side's prefix and folder), or the
envelope is refused with ``PayloadError`` before anything is read; deletion uses the
derivation only. So an envelope cannot read, answer with or delete another job's input,
or any other key (``hb:models``, say). An ensemble member's task may also read its
stage's shared input (``ensemble.stage_input_key``), derived from the member's job id,
and never deletes it (fusion drops it).
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

import pyarrow as pa
import redis

from hetbatch.producers.errors import JobLost, PayloadError, PayloadTooLarge
from hetbatch.producers.protocol import parts, shm
from hetbatch.producers.protocol.ensemble import member_job_id, stage_input_key
from hetbatch.producers.protocol.ipc import ipc_size, write_ipc
from hetbatch.producers.protocol.keys import Keys
from hetbatch.producers.protocol.wire import Item, TaskEnvelope, encode_table, write_result

__all__ = ["Placed", "Transport"]

log = logging.getLogger(__name__)

# ensemble.member_job_id: "<job>~<stage>.<slot>"; checked against that function below.
_MEMBER = re.compile(r"(?P<job>.+)~(?P<stage>\d{1,6})\.(?P<slot>\d{1,6})")


def _unit(env: TaskEnvelope) -> Item:
    """What an envelope's input is stored under: its pack, or its first item."""
    return env.units[0]


@dataclass(frozen=True)
class Placed:
    """Where ``Transport.place`` put a payload: the envelope's one payload field."""

    payload_key: str | None = None
    payload_b64: str | None = None
    payload_shm: str | None = None

    def envelope(
        self,
        model: str,
        version: str,
        items: Sequence[Item],
        reply_to: str | None,
        deadline: float | None,
        pack: str | None = None,
    ) -> TaskEnvelope:
        """The task envelope of ``items`` of ``model@version``, carrying this payload."""
        return TaskEnvelope(
            model=model,
            version=version,
            items=tuple(items),
            payload_key=self.payload_key,
            payload_b64=self.payload_b64,
            payload_shm=self.payload_shm,
            reply_to=reply_to,
            deadline=deadline,
            pack=pack,
        )


@dataclass(frozen=True)
class Transport:
    """Payload placement, reading and deletion for one deployment on one host.

    Args:
        keys: the deployment's key names (its prefix).
        shm_dir: this side's shared-memory folder ("" for none).
        max_bytes: largest payload accepted, in bytes (sent or read).
        inline_max_bytes: payloads up to this many bytes ride inside the message.
        ttl_s: how long, in seconds, a payload waits in Redis or shared memory.
        result_file_min_bytes: a result this big, of a chunk whose input came in a file,
            goes back in a file too (``place_result``).
    """

    keys: Keys
    shm_dir: str = ""
    max_bytes: int = 256 * 1024 * 1024
    inline_max_bytes: int = 8_192
    ttl_s: int = 86_400
    # Below a MiB the two Redis copies cost less than the file's open, write and unlink.
    result_file_min_bytes: int = 1 << 20

    # -- out -------------------------------------------------------------------

    def place(self, blob: bytes | memoryview, unit: str, chunk: int, pipe: Any, *, to_shm: bool = False) -> Placed:
        """Put ``blob``, the input of ``(unit, chunk)``, on its way; returns the envelope's
        payload field. A Redis key is written on ``pipe`` (the publishing round trip).

        Args:
            blob: the chunk's Arrow IPC bytes.
            unit: the job id (or pack id) the input belongs to.
            chunk: the chunk number.
            pipe: where Redis writes are queued (a pipeline or ``publisher.Batch``).
            to_shm: write it to the shared-memory folder (falls back to Redis when the
                file cannot be written: the folder is full or gone).

        Raises:
            PayloadTooLarge: ``blob`` is over ``max_bytes``.
        """
        if len(blob) > self.max_bytes:
            raise PayloadTooLarge(len(blob), self.max_bytes)
        if to_shm and (placed := self._to_shm(unit, chunk, len(blob), lambda f: f.write(blob))) is not None:
            return placed
        if len(blob) <= self.inline_max_bytes:
            return Placed(payload_b64=base64.b64encode(blob).decode())
        key = self.keys.input(unit, chunk)
        pipe.set(key, blob, ex=self.ttl_s)
        return Placed(payload_key=key)

    def place_table(
        self, table: pa.Table, unit: str, chunk: int, pipe: Any, *, to_shm: bool = False
    ) -> tuple[Placed, int]:
        """``place`` for rows not yet encoded, and their encoded length. To shared memory,
        the stream is written from the table's buffers: a 1.2 GB job of images is copied
        once on its way out, not twice."""
        if to_shm and self.shm_dir:
            size = ipc_size(table)
            if size > self.max_bytes:
                raise PayloadTooLarge(size, self.max_bytes)
            if (placed := self._to_shm(unit, chunk, size, lambda f: write_ipc(f, table))) is not None:
                return placed, size
        blob = encode_table(table)
        return self.place(blob, unit, chunk, pipe), len(blob)

    def _to_shm(self, unit: str, chunk: int, size: int, fill: Callable[[BinaryIO], object]) -> Placed | None:
        """The input file of ``(unit, chunk)`` written by ``fill``; None: go through Redis
        (no folder, or the file cannot be written: the folder is full or gone)."""
        if not self.shm_dir:
            return None
        name = shm.payload_name(unit, chunk)
        try:
            shm.write_with(self.shm_dir, name, size, fill)
            return Placed(payload_shm=name)
        except OSError as exc:
            log.warning("%s not written (%s); the chunk goes through Redis", name, exc)
            shm.unlink(self.shm_dir, [name])
            return None

    def store(self, pipe: Any, key: str, blob: bytes | memoryview) -> None:
        """Queue on ``pipe`` an input whose key the caller derived (an ensemble stage's).

        Raises:
            PayloadTooLarge: ``blob`` is over ``max_bytes``.
        """
        if len(blob) > self.max_bytes:
            raise PayloadTooLarge(len(blob), self.max_bytes)
        pipe.set(key, blob, ex=self.ttl_s)

    # -- in --------------------------------------------------------------------

    def allowed_keys(self, env: TaskEnvelope) -> list[str]:
        """The Redis keys ``env``'s input may live under, derived from its job id."""
        unit = _unit(env)
        own = [self.keys.input(unit.job_id, unit.chunk)]
        member = _MEMBER.fullmatch(unit.job_id) if env.then is not None else None
        if member is not None:
            job, stage, slot = member["job"], int(member["stage"]), int(member["slot"])
            if member_job_id(job, stage, slot) == unit.job_id:
                own.append(stage_input_key(self.keys, job, stage, unit.chunk))
        return own

    def check(self, env: TaskEnvelope) -> None:
        """Refuse an envelope whose payload names a key or file not derived from its job id.

        Raises:
            PayloadError: naming the job, the name given and the one expected.
        """
        unit = _unit(env)
        if env.payload_key is not None and env.payload_key not in self.allowed_keys(env):
            raise PayloadError(
                f"job {unit.job_id}: its envelope names payload key {env.payload_key!r}, not its own "
                f"{self.allowed_keys(env)[0]!r}; refused (was the task written by hand?)"
            )
        if env.payload_shm is not None and env.payload_shm != shm.payload_name(unit.job_id, unit.chunk):
            raise PayloadError(
                f"job {unit.job_id}: its envelope names {env.payload_shm!r}, which is not a shared-memory payload "
                f"name of this job ({shm.payload_name(unit.job_id, unit.chunk)!r}); refused"
            )

    def read(self, client: redis.Redis, env: TaskEnvelope) -> bytes | memoryview:
        """The input bytes of ``env``, after ``check``; sizes are checked before reading
        (STRLEN, the file's size), so a refused value is never fetched whole.

        Raises:
            PayloadError: a name not this job's, a value of the wrong type, a file that
                is not a regular file, or corrupt base64.
            PayloadTooLarge: the value is over ``max_bytes``.
            JobLost: the key or file is gone (TTL passed, Redis or the host restarted).
        """
        self.check(env)
        job = _unit(env).job_id
        if env.payload_key is not None:
            return self._get(client, env.payload_key, job)
        if env.payload_shm is not None:
            return shm.read_payload(self.shm_dir, env.payload_shm, job, self.max_bytes)
        data = env.inline_payload()
        if len(data) > self.max_bytes:
            raise PayloadTooLarge(len(data), self.max_bytes)
        return data

    def _get(self, client: redis.Redis, key: str, job: str) -> bytes:
        try:
            size = int(client.strlen(key))
            if size > self.max_bytes:
                raise PayloadTooLarge(size, self.max_bytes)
            data = cast(bytes | None, client.get(key))
        except redis.ResponseError as exc:  # WRONGTYPE: not a string written by a producer
            raise PayloadError(f"job {job}: its input {key} is not a payload: {exc}") from exc
        if data is None:
            raise JobLost(job, f"input {key} is gone (TTL passed or Redis lost it)")
        if len(data) > self.max_bytes:  # rewritten between the two commands
            raise PayloadTooLarge(len(data), self.max_bytes)
        return data

    # -- delete ----------------------------------------------------------------

    def inputs(self, units: Iterable[tuple[str, int]]) -> tuple[list[str], list[str]]:
        """The Redis keys ``(unit, chunk)`` inputs can have, and the shared-memory files
        their inputs and results can have."""
        pairs = list(units)
        files = [shm.payload_name(u, c) for u, c in pairs]
        files += [name for u, c in pairs if (name := shm.result_name(u, c)) is not None]
        return [self.keys.input(u, c) for u, c in pairs], files

    def consumed(self, envs: Sequence[TaskEnvelope]) -> tuple[list[str], list[str]]:
        """What to delete once ``envs`` have their results stored: the derived key or file
        of each envelope's own input (an ensemble member's input is left to fusion)."""
        keys: list[str] = []
        files: list[str] = []
        for env in envs:
            if env.then is not None or env.payload_b64 is not None:
                continue
            unit = _unit(env)
            if env.payload_key is not None:
                keys.append(self.keys.input(unit.job_id, unit.chunk))
            else:
                files.append(shm.payload_name(unit.job_id, unit.chunk))
        return keys, files

    def drop(self, client: Any, keys: Sequence[str], files: Sequence[str]) -> int:
        """Delete input ``keys`` (on ``client``, a Redis or a pipeline) and ``files`` in this
        side's folder; returns how many keys existed (0 on a pipeline)."""
        deleted = 0
        if keys:
            got = client.delete(*keys)
            deleted = got if isinstance(got, int) else 0
        shm.unlink(self.shm_dir, list(files))
        return deleted

    # -- results ---------------------------------------------------------------

    def place_result(self, table: pa.Table, unit: str, chunk: int) -> bytes | None:
        """Write ``table``, the result rows of ``(unit, chunk)`` whose input came in a file,
        to its result file: ``wire.encode_result``'s bytes, straight from the table's
        buffers (a record batch per model call, never joined). Returns the reference to
        store under its result key, or ``None``: store the encoded rows instead (too small,
        no folder, a unit that names no file, the folder full, or the file there already:
        another execution's, maybe being read).
        """
        name = shm.result_name(unit, chunk)
        if not self.shm_dir or name is None:
            return None
        size = 1 + ipc_size(table)
        if size < self.result_file_min_bytes:
            return None
        try:
            shm.write_with(self.shm_dir, name, size, lambda f: write_result(f, table), exclusive=True)
        except FileExistsError:
            return None
        except OSError as exc:  # write_with deleted what it wrote of it
            log.warning("%s not written (%s); the result goes through Redis", name, exc)
            return None
        return parts.file_ref(size)

    def read_results(self, job_id: str, unit: str, payloads: Mapping[int, bytes]) -> dict[int, bytes | memoryview]:
        """``payloads`` (chunk -> stored result of ``unit``, the job's id or its pack's) with
        each file reference replaced by its file's bytes, the file deleted; errors name ``job_id``.

        Raises:
            JobLost: a file is gone (read already, swept, or on another host).
            PayloadError: a file is not a regular file, or not of the size stored.
            JobFailed: a reference is corrupt (remote type PayloadError).
        """
        out: dict[int, bytes | memoryview] = dict(payloads)
        for chunk in sorted(c for c, v in payloads.items() if parts.is_file_ref(v)):
            size = parts.read_file_ref(job_id, chunk, payloads[chunk])
            out[chunk] = shm.read_result(self.shm_dir, job_id, unit, chunk, size)
        return out
