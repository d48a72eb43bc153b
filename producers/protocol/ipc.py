"""Guarded reading of Arrow IPC streams that come from untrusted bytes.

``pyarrow.ipc.open_stream(...).read_all()`` trusts the stream's metadata: a record
batch may declare LZ4/ZSTD body compression (a few KiB inflating to GiBs before
anything can be checked), dictionary batches, deeply nested or extension types. This
module reads the stream message by message and, before pyarrow touches a body:

- the schema must use only the wire's types (``ALLOWED_TYPES``: what
  ``producers.protocol.schema`` produces), flat or as a fixed-size list of them, or a
  (32-bit offset) list of numbers or of fixed-size lists of numbers for ragged rows;
  the only extension type accepted is ``arrow.fixed_shape_tensor``;
- every record batch header is parsed (flatbuffers, bounds-checked) and refused if it
  declares compression, a negative or over-``max_rows`` length, or buffers outside
  the message body; dictionary batches are refused;
- after reading, ``validate(full=True)`` checks every offset and value.

Uncompressed buffers are zero-copy slices of the input, so the decoded size can never
exceed the payload size. Every failure raises ``PayloadError``.
"""

from __future__ import annotations

import struct
from typing import Any

import pyarrow as pa

from hetbatch.producers.errors import PayloadError

__all__ = ["ALLOWED_TYPES", "MAX_COLUMNS", "check_type", "ipc_size", "read_stream", "write_ipc"]

ALLOWED_TYPES: frozenset[pa.DataType] = frozenset(
    [
        pa.bool_(),
        pa.string(),
        *(pa.int8(), pa.int16(), pa.int32(), pa.int64()),
        *(pa.uint8(), pa.uint16(), pa.uint32(), pa.uint64()),
        *(pa.float16(), pa.float32(), pa.float64()),
    ]
)
MAX_COLUMNS = 4096
_EXTENSION_KEY = b"ARROW:extension:name"
_RECORD_BATCH = 3  # MessageHeader union tag in Message.fbs


def check_type(name: str, t: pa.DataType) -> None:
    """Refuse any column type the wire does not use.

    Raises:
        PayloadError: naming the column and its type.
    """
    if isinstance(t, pa.FixedShapeTensorType):
        t = t.storage_type
    whole = t
    ragged = pa.types.is_list(t)  # a ragged input or output (producers.protocol.ragged): one level, 32-bit offsets
    if ragged:
        t = t.value_type
    # A fixed-size list of strings is a text input of per-row shape (k,), e.g. skl2onnx's
    # [None, 1]; strings never come in variable-length rows.
    fixed = pa.types.is_fixed_size_list(t) and t.value_type in ALLOWED_TYPES
    if fixed and not (ragged and t.value_type == pa.string()):
        if t.list_size <= 0:
            raise PayloadError(f"column {name!r}: fixed-size list of size {t.list_size}")
        return
    if t not in ALLOWED_TYPES or (ragged and t == pa.string()):
        raise PayloadError(
            f"column {name!r} has type {whole}, which the wire does not carry (allowed: bool, string, "
            "(u)int8-64, float16-64, fixed-size lists of those, and lists of numbers or of fixed-size lists of numbers)"
        )


def _check_schema(schema: pa.Schema) -> None:
    if len(schema) > MAX_COLUMNS:
        raise PayloadError(f"payload has {len(schema)} columns; at most {MAX_COLUMNS} are accepted")
    for f in schema:
        ext = (f.metadata or {}).get(_EXTENSION_KEY)
        if ext is not None:
            raise PayloadError(f"column {f.name!r} has extension type {ext!r}, which the wire does not carry")
        check_type(f.name, f.type)


class _Flat:
    """Just enough of a flatbuffer reader for an IPC ``Message`` header, bounds-checked."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def _unpack(self, fmt: str, pos: int) -> int:
        size = struct.calcsize(fmt)
        if pos < 0 or pos + size > len(self.data):
            raise PayloadError("record batch header is truncated or points outside itself")
        value: int = struct.unpack_from(fmt, self.data, pos)[0]
        return value

    def table(self, pos: int) -> tuple[int, int, int]:
        """(table position, vtable position, vtable size) of the table at ``pos``."""
        vtable = pos - self._unpack("<i", pos)
        return pos, vtable, self._unpack("<H", vtable)

    def field(self, table: tuple[int, int, int], index: int) -> int | None:
        pos, vtable, size = table
        slot = 4 + 2 * index
        if slot + 2 > size:
            return None
        offset = self._unpack("<H", vtable + slot)
        return pos + offset if offset else None

    def scalar(self, table: tuple[int, int, int], index: int, fmt: str, default: int = 0) -> int:
        at = self.field(table, index)
        return default if at is None else self._unpack(fmt, at)

    def child(self, table: tuple[int, int, int], index: int) -> int | None:
        at = self.field(table, index)
        return None if at is None else at + self._unpack("<I", at)


def _check_batch_header(metadata: bytes, body_size: int, max_rows: int | None) -> int:
    """Validate a record batch message header before its body is read; returns its row count."""
    flat = _Flat(metadata)
    message = flat.table(flat._unpack("<I", 0))
    if flat.scalar(message, 1, "<B") != _RECORD_BATCH:
        raise PayloadError("payload holds a message that is not a record batch (dictionaries are refused)")
    header_at = flat.child(message, 2)
    if header_at is None:
        raise PayloadError("record batch message has no header")
    batch = flat.table(header_at)
    if flat.field(batch, 3) is not None:
        raise PayloadError("record batch declares compressed buffers; the wire carries uncompressed Arrow only")
    rows = flat.scalar(batch, 0, "<q")
    if rows < 0 or (max_rows is not None and rows > max_rows):
        raise PayloadError(f"record batch declares {rows} rows; at most {max_rows} are expected")
    buffers_at = flat.child(batch, 2)
    if buffers_at is not None:
        count = flat._unpack("<I", buffers_at)
        for i in range(count):
            offset = flat._unpack("<q", buffers_at + 4 + 16 * i)
            length = flat._unpack("<q", buffers_at + 12 + 16 * i)
            if offset < 0 or length < 0 or offset + length > body_size:
                raise PayloadError(f"buffer {i} ({offset}+{length} bytes) lies outside the {body_size}-byte body")
    return rows


def read_stream(data: bytes | memoryview, *, max_rows: int | None = None) -> pa.Table:
    """Read and fully validate an Arrow IPC stream from untrusted bytes (see module docstring).

    Raises:
        PayloadError: the stream is malformed, uses a refused feature or type, or has
            more than ``max_rows`` rows.
    """
    try:
        reader = pa.ipc.MessageReader.open_stream(pa.py_buffer(data))
        try:
            first = reader.read_next_message()
        except StopIteration:
            raise PayloadError("payload is empty: no Arrow schema message") from None
        if first.type != "schema":
            raise PayloadError(f"payload starts with a {first.type} message, not a schema")
        schema = pa.ipc.read_schema(first)
        _check_schema(schema)
        batches, rows = [], 0
        while True:
            try:
                message = reader.read_next_message()
            except StopIteration:
                break
            body = message.body
            rows += _check_batch_header(message.metadata.to_pybytes(), body.size if body is not None else 0, max_rows)
            if max_rows is not None and rows > max_rows:
                raise PayloadError(f"payload has more than {max_rows} rows")
            batches.append(pa.ipc.read_record_batch(message, schema))
        table = pa.Table.from_batches(batches, schema=schema)
        table.validate(full=True)
    except PayloadError:
        raise
    except (pa.ArrowException, OSError, ValueError, TypeError, IndexError, KeyError, struct.error) as exc:
        raise PayloadError(f"payload is not a valid Arrow IPC stream: {exc}") from exc
    return table


def ipc_size(table: pa.Table | pa.RecordBatch) -> int:
    """The length of what ``write_ipc`` writes, counted without copying a value."""
    sink = pa.MockOutputStream()
    write_ipc(sink, table)
    return int(sink.size())


def write_ipc(sink: Any, table: pa.Table | pa.RecordBatch) -> None:
    """Write ``table`` as one Arrow IPC stream (``wire.encode_table``'s bytes after its
    tag) to ``sink``, a file or Arrow stream, from the table's own buffers."""
    stream = sink if isinstance(sink, pa.NativeFile) else pa.PythonFile(sink, mode="w")
    with pa.ipc.new_stream(stream, table.schema) as writer:
        writer.write(table)
