"""The wire contract between producers and workers: the one module both sides import.

Task messages are JSON (Celery's ``json`` serializer; pickle is never accepted). The
rows of a task travel as Arrow IPC stream bytes, by reference (a Redis key with a TTL)
or, when small, inline as base64. One task carries one or more *items*: a chunk of a
big job is one item; coalesced small jobs are several items whose rows are
concatenated in order. Results are stored per item under ``result_key`` and announced
on the producer's reply list. Every decoding failure raises ``PayloadError``.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple

import pyarrow as pa

from hetbatch.producers.errors import PayloadError, PayloadTooLarge, RemoteError
from hetbatch.producers.protocol.fields import MAX_INLINE, Fields, answerable_fields, first_job, read_item
from hetbatch.producers.protocol.ipc import read_stream, write_ipc
from hetbatch.producers.protocol.keys import is_reply

__all__ = [
    "CELERY_WIRE_CONFIG",
    "DEVICES",
    "DEVICE_KEY",
    "FRAMEWORKS",
    "FUSE_TASK_NAME",
    "FUSION_QUEUE",
    "SCHEMA_VERSION",
    "TASK_NAME",
    "Item",
    "Notice",
    "Status",
    "TaskEnvelope",
    "answerable",
    "decode_notice",
    "decode_pack_result",
    "decode_result",
    "decode_table",
    "encode_error",
    "encode_notice",
    "encode_pack_result",
    "encode_result",
    "encode_results",
    "encode_table",
    "pack_header",
    "queue_for",
    "write_result",
]

SCHEMA_VERSION = 1
TASK_NAME = "hetbatch.predict"
# Ensembles: the step that combines members' stored results runs on this queue (cpu pool).
FUSE_TASK_NAME = "hetbatch.fuse"
FUSION_QUEUE = "fusion.cpu"
FRAMEWORKS = ("sklearn", "onnx", "torch", "tensorflow")
DEVICES = ("cpu", "gpu")
# Result schema metadata: the device that ran the chunk ("cpu,gpu" once a job's chunks differ).
DEVICE_KEY = b"hetbatch.device"

# Shared by the producer's and the worker's Celery apps: JSON only, so a pickled
# message is refused by kombu before any task code sees it.
CELERY_WIRE_CONFIG: dict[str, Any] = {
    "task_serializer": "json",
    "result_serializer": "json",
    "accept_content": ["json"],
    "result_accept_content": ["json"],
    "event_serializer": "json",
}

_OK = b"A"  # result tag: Arrow IPC follows
_ERR = b"E"  # result tag: JSON RemoteError follows
_PACK = b"P"  # result tag: a pack's results: header length, JSON header, Arrow IPC of its ok rows


class Status(str, Enum):
    """Where a job stands, as ``Job.status()`` reports it."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"
    EXPIRED = "expired"
    LOST = "lost"


def queue_for(framework: str, device: str) -> str:
    """Name of the queue that carries jobs for one framework on one kind of device."""
    return f"{framework}.{device}"


class Item(NamedTuple):
    """One job chunk inside a task: ``rows`` consecutive rows of the task payload (a named
    tuple: a pack builds hundreds per task, at a third of a frozen dataclass's cost)."""

    job_id: str
    chunk: int
    rows: int


@dataclass(frozen=True)
class TaskEnvelope:
    """The JSON body of one predict task. Tensors never enter it; only references."""

    model: str
    version: str
    items: tuple[Item, ...]
    payload_key: str | None = None
    payload_b64: str | None = None
    # The name of a file in the shared-memory folder both sides see (producers.protocol.shm).
    payload_shm: str | None = None
    reply_to: str | None = None
    deadline: float | None = None  # unix seconds
    v: int = SCHEMA_VERSION
    # Optional: set on an ensemble member's task. The worker that stores the item's
    # result hands it to the ensemble step (producers/ensemble.py: Continuation).
    then: dict[str, Any] | None = None
    # Optional: the id of a pack of small jobs (``Client.submit_many``). The items' results
    # are then stored, announced and attempted together, as the one unit ``(pack, 0)``.
    pack: str | None = None
    # Optional: the W3C traceparent of the submit span (``producers.protocol.tracing``).
    trace: str | None = None

    @property
    def ref(self) -> str:
        """The model as ``name@version``."""
        return f"{self.model}@{self.version}"

    @property
    def rows(self) -> int:
        return sum(item.rows for item in self.items)

    @property
    def units(self) -> tuple[Item, ...]:
        """What results are stored under (``Keys.result(job_id, chunk)``): each item, or the pack."""
        return (Item(self.pack, 0, self.rows),) if self.pack is not None else self.items

    def describe(self) -> str:
        """Readable summary for logs and Flower: never the payload."""
        first = self.items[0].job_id if self.items else "-"
        return f"{self.ref} jobs={len(self.items)} first={first} rows={self.rows}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"v": self.v, "model": self.model, "version": self.version}
        if self.pack is not None and all(
            i.job_id == f"{self.pack}-{n}" and i.chunk == 0 for n, i in enumerate(self.items)
        ):
            # A pack's job ids follow from its id: its rows are all the items need (a
            # fifth of the JSON per job to write, store and parse).
            out["sizes"] = [i.rows for i in self.items]
        else:
            out["items"] = [[i.job_id, i.chunk, i.rows] for i in self.items]
        for name in ("payload_key", "payload_b64", "payload_shm", "reply_to", "deadline", "then", "pack", "trace"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    @classmethod
    def from_dict(cls, data: Any) -> TaskEnvelope:
        """Parse and check a task body: every field's type and size (``producers.protocol.fields``),
        that a pack's items are its jobs, that ``reply_to`` names a reply list, and that
        exactly one payload reference is given.

        Raises:
            PayloadError: the body is not a valid envelope of this schema version; the
                message names the job (when an id can be read) and the field.
        """
        if not isinstance(data, dict):
            raise PayloadError(f"malformed task envelope: a JSON {type(data).__name__}, not an object")
        f = Fields(data, first_job(data))
        if data.get("v") != SCHEMA_VERSION:
            f.fail("v", f"is {str(data.get('v'))[:20]!r}; this worker reads schema version {SCHEMA_VERSION}")
        pack = None if data.get("pack") is None else f.ident("pack")
        if "sizes" in data:
            if pack is None:
                f.fail("pack", "is missing: a task with sizes is a pack")
            items = tuple(Item(f"{pack}-{n}", 0, f.count("sizes", r)) for n, r in enumerate(f.seq("sizes")))
        else:
            items = tuple(_item(f, entry) for entry in f.seq("items"))
            if pack is not None and any(i.job_id != f"{pack}-{n}" or i.chunk for n, i in enumerate(items)):
                f.fail("pack", f"is {pack!r}, but the items are not its jobs {pack}-0, {pack}-1, ... at chunk 0")
        reply_to = f.opt_text("reply_to")
        if reply_to is not None and not is_reply(reply_to):
            f.fail("reply_to", f"names {reply_to[:60]!r}, which is not a reply list")
        refs = ("payload_key", "payload_b64", "payload_shm")
        if sum(data.get(name) is not None for name in refs) != 1:
            f.fail("payload_key", "and payload_b64, payload_shm: exactly one of them must be given")
        return cls(
            model=f.text("model"),
            version=f.text("version"),
            items=items,
            payload_key=f.opt_text("payload_key"),
            payload_b64=f.opt_text("payload_b64", max_len=MAX_INLINE, empty=True),  # "" is an empty payload
            payload_shm=f.opt_text("payload_shm"),
            reply_to=reply_to,
            deadline=f.number("deadline"),
            then=f.obj("then"),
            pack=pack,
            trace=f.trace("trace"),
        )

    def inline_payload(self) -> bytes:
        """Decode the inline base64 payload.

        Raises:
            PayloadError: the base64 text is corrupt.
        """
        try:
            return base64.b64decode(self.payload_b64 or "", validate=True)
        except (binascii.Error, ValueError) as exc:
            raise PayloadError(f"inline payload is not valid base64: {exc}") from exc


def _item(f: Fields, entry: Any) -> Item:
    return Item(*read_item(f, entry))


def answerable(data: Any) -> TaskEnvelope | None:
    """What of a body ``from_dict`` refused can still be answered (``fields.answerable``):
    an envelope of its jobs (or its pack) and its reply list; None when no job can be named.
    Storing the refusal as these jobs' error result answers their producer (no hang)."""
    found = answerable_fields(data)
    if found is None:
        return None
    items, reply_to, pack = found
    return TaskEnvelope("?", "?", tuple(Item(*i) for i in items), payload_b64="", reply_to=reply_to, pack=pack)


def encode_table(table: pa.Table | pa.RecordBatch, tag: bytes = b"") -> memoryview:
    """Serialize rows as one Arrow IPC stream (uncompressed: decoding stays zero-copy),
    after ``tag``, into one buffer: the rows are copied once, and Redis takes the view as is."""
    sink = pa.BufferOutputStream()
    sink.write(tag)
    write_ipc(sink, table)
    return memoryview(sink.getvalue())


def decode_table(data: bytes | memoryview, *, max_bytes: int | None = None, max_rows: int | None = None) -> pa.Table:
    """Read an Arrow IPC stream, checking it fully before any column is used.

    The schema must use the wire's types only, record batches must be uncompressed and
    within ``max_rows`` (see ``producers.protocol.ipc``). Buffers of the result point into
    ``data`` (no copy for fixed-width columns).

    Raises:
        PayloadTooLarge: ``data`` is larger than ``max_bytes``.
        PayloadError: the bytes are not a valid, acceptable Arrow IPC stream.
    """
    size = len(data)
    if max_bytes is not None and size > max_bytes:
        raise PayloadTooLarge(size, max_bytes)
    return read_stream(data, max_rows=max_rows)


def encode_result(table: pa.Table) -> memoryview:
    """A successful item result: tag + Arrow IPC."""
    return encode_table(table, _OK)


def write_result(sink: Any, table: pa.Table) -> None:
    """``encode_result``'s bytes (``1 + ipc_size(table)`` of them) written to a file from the table's buffers."""
    sink.write(_OK)
    write_ipc(sink, table)


_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # IPC end-of-stream marker


def encode_results(table: pa.Table, slices: Sequence[tuple[int, int]]) -> list[bytes | memoryview]:
    """``encode_result`` of each ``(offset, rows)`` slice of ``table``, sharing one
    encoded schema: ~4x cheaper than a stream writer per slice for small jobs."""
    if len(slices) == 1 and slices[0] == (0, table.num_rows):
        return [encode_result(table)]  # one copy of a big chunk's rows, not three
    batch = table.combine_chunks().to_batches()[0] if table.num_rows else pa.RecordBatch.from_pylist([], table.schema)
    head = _OK + table.schema.serialize().to_pybytes()
    return [head + batch.slice(offset, rows).serialize().to_pybytes() + _EOS for offset, rows in slices]


def encode_error(error: RemoteError) -> bytes:
    """A failed item result: tag + JSON (type, message, details)."""
    body = {"type": error.type, "message": error.message, "details": error.details}
    return _ERR + json.dumps(body, default=str).encode()


def decode_result(data: bytes | memoryview) -> pa.Table | RemoteError:
    """Inverse of ``encode_result`` / ``encode_error``.

    Raises:
        PayloadError: the stored bytes are neither.
    """
    tag, body = bytes(data[:1]), memoryview(data)[1:]
    if tag == _OK:
        return _read_result(body)
    if tag == _ERR:
        try:
            obj = json.loads(bytes(body))
            return RemoteError(str(obj["type"]), str(obj["message"]), dict(obj.get("details") or {}))
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise PayloadError(f"stored error result is corrupt: {exc}") from exc
    raise PayloadError(f"stored result has unknown tag {tag!r}")


def _read_result(body: memoryview) -> pa.Table:
    # Written by our workers: pyarrow's own reader plus full validation is enough here
    # (the guarded reader in producers.protocol.ipc is for task payloads from producers).
    try:
        table = pa.ipc.open_stream(pa.py_buffer(body)).read_all()
        table.validate(full=True)
        return table
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise PayloadError(f"stored result is not a valid Arrow IPC stream: {exc}") from exc


def encode_pack_result(items: Sequence[int | RemoteError], tables: Sequence[pa.Table]) -> bytes | memoryview:
    """The stored result of a pack: per item in order, its row count or its error; the
    succeeded items' rows are the rows of ``tables``, concatenated, in item order.

    Layout: tag, 4-byte little-endian header length, JSON header (per item its row count
    or its error), then one Arrow IPC stream of every succeeded item's rows.
    """
    header = [n if isinstance(n, int) else {"type": n.type, "message": n.message, "details": n.details} for n in items]
    head = json.dumps(header, default=str).encode()
    tag = _PACK + len(head).to_bytes(4, "little") + head
    if not tables:
        return tag
    return encode_table(tables[0] if len(tables) == 1 else pa.concat_tables(tables).combine_chunks(), tag)


def pack_header(data: bytes | memoryview) -> list[int | RemoteError]:
    """Per item of a stored pack result: its row count, or its error.

    Raises:
        PayloadError: ``data`` is not a pack result.
    """
    try:
        if data[:1] != _PACK:
            raise ValueError(f"tag {data[:1]!r}")
        size = int.from_bytes(data[1:5], "little")
        raw = json.loads(bytes(data[5 : 5 + size]))
        return [
            n if isinstance(n, int) else RemoteError(str(n["type"]), str(n["message"]), dict(n.get("details") or {}))
            for n in raw
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise PayloadError(f"stored pack result is corrupt: {exc}") from exc


def decode_pack_result(data: bytes) -> list[pa.Table | RemoteError]:
    """Inverse of ``encode_pack_result``: each item's table (a zero-copy slice) or error.

    Raises:
        PayloadError: the stored bytes are not a valid pack result.
    """
    header = pack_header(data)
    rows = sum(n for n in header if isinstance(n, int))
    start = 5 + int.from_bytes(data[1:5], "little")
    table = _read_result(memoryview(data)[start:]) if len(data) > start else None
    if (0 if table is None else table.num_rows) != rows:
        raise PayloadError(f"stored pack result does not hold the {rows} rows its header lists")
    out: list[pa.Table | RemoteError] = []
    offset = 0
    for n in header:
        if isinstance(n, int):
            assert table is not None
            out.append(table.slice(offset, n))
            offset += n
        else:
            out.append(n)
    return out


@dataclass(frozen=True)
class Notice:
    """A worker's announcement on the producer's reply list that an item finished. ``result``:
    the stored result when small (no further round trip), else the producer reads ``Keys.result``."""

    job_id: str
    chunk: int
    result: bytes | None = None


def encode_notice(notice: Notice) -> bytes:
    head = json.dumps([notice.job_id, notice.chunk]).encode()
    return head + b"\n" + (notice.result or b"")


def decode_notice(data: bytes) -> Notice:
    """Raises PayloadError on a malformed notice."""
    head, _, rest = data.partition(b"\n")
    try:
        job_id, chunk = json.loads(head)
        return Notice(str(job_id), int(chunk), rest if rest else None)
    except (ValueError, TypeError, RecursionError) as exc:
        raise PayloadError(f"malformed reply notice: {exc}") from exc
