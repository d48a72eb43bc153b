"""Cutting a job into chunks by rows and by bytes.

A chunk is one task: its encoded input must stay under ``max_payload_bytes`` (both
sides check), and its stored result under the worker's ``max_result_bytes``. Cutting
by rows alone (``chunk_rows``) fails for wide rows: 1,000 images of 3x224x224 float32
are 602 MB. So a chunk also stops at ``chunk_bytes``, counting for each row the larger
of its input bytes and its expected output bytes (fixed-shape outputs are known from
the registry entry; a variable-length output is counted as its input row). Rows of
variable size (strings, token sequences) are counted one by one from their offsets.
A row is never split: one larger than the payload limit is the only input that fails.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hetbatch.producers.errors import PayloadTooLarge

__all__ = ["IPC_SLACK_BYTES", "arrays_bytes", "chunk_bounds", "row_bytes"]

IPC_SLACK_BYTES = 64 * 1024
"""Room left in a payload for the Arrow stream's schema and framing (a few KiB with
thousands of columns, far less usually)."""


def _value_width(t: pa.DataType) -> int:
    """Bytes of one element of a list's values (a fixed-size list counts all its items)."""
    if pa.types.is_fixed_size_list(t):
        return int(t.list_size) * _value_width(t.value_type)
    if pa.types.is_boolean(t):
        return 1  # bit-packed on the wire; a byte is the safe side
    return max(1, int(t.bit_width) // 8)


def _column_bytes(col: pa.ChunkedArray) -> np.ndarray | int:
    """Bytes of each row of ``col`` on the wire: an array for variable-size rows, else one int."""
    t = col.type
    if isinstance(t, pa.BaseExtensionType):  # fixed_shape_tensor: its storage is what travels
        t = t.storage_type
        col = pa.chunked_array([c.storage for c in col.chunks], type=t)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t):
        lengths: np.ndarray = pc.binary_length(col).to_numpy(zero_copy_only=False).astype(np.int64)
        return lengths + (8 if pa.types.is_large_string(t) else 4)
    if pa.types.is_fixed_size_list(t) and pa.types.is_string(t.value_type):  # text of shape (k,)
        flat = [pc.binary_length(c.flatten()).to_numpy(zero_copy_only=False) for c in col.chunks]
        chars = np.concatenate(flat or [np.zeros(0)]).astype(np.int64).reshape(-1, t.list_size)
        per_row: np.ndarray = chars.sum(axis=1) + 4 * t.list_size
        return per_row
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        counts: np.ndarray = pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64)
        return counts * _value_width(t.value_type) + (8 if pa.types.is_large_list(t) else 4)
    try:
        return _value_width(t)
    except ValueError:  # a type the wire refuses anyway (the worker says so): its mean row size
        return -(-int(col.nbytes) // max(1, len(col)))


def arrays_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes of named arrays' data; an object array (strings, variable-length rows)
    counts its elements' bytes, not its pointers."""
    total = 0
    for arr in arrays.values():
        if arr.dtype.kind != "O":
            total += arr.nbytes
            continue
        for value in arr.reshape(-1):
            total += value.nbytes if isinstance(value, np.ndarray) else len(str(value).encode()) + 4
    return total


def row_bytes(table: pa.Table, out_row_bytes: int = 0) -> np.ndarray | int:
    """What each row of ``table`` weighs for chunking: its input bytes, or its expected
    output bytes (``out_row_bytes``) when those are more. An int when every row weighs
    the same."""
    fixed, variable = 0, None
    for col in table.columns:
        size = _column_bytes(col)
        if isinstance(size, int):
            fixed += size
        else:
            variable = size if variable is None else variable + size
    if variable is None:
        return max(fixed, out_row_bytes, 1)
    out: np.ndarray = np.maximum(variable + fixed, out_row_bytes)
    return out


def chunk_bounds(
    table: pa.Table, *, max_rows: int, max_bytes: int, max_payload_bytes: int, out_row_bytes: int = 0
) -> list[tuple[int, int]]:
    """``(start, rows)`` of each chunk of ``table``: at most ``max_rows`` rows and
    ``max_bytes`` bytes (``row_bytes``) each, at least one row each, in order.

    Raises:
        PayloadTooLarge: one row's input alone does not fit in ``max_payload_bytes``
            (naming the row and its size).
    """
    n = table.num_rows
    max_rows = max(1, max_rows)
    budget = max(1, min(max_bytes, max_payload_bytes - IPC_SLACK_BYTES))
    inputs = row_bytes(table)
    if isinstance(inputs, int):
        if inputs > max_payload_bytes - IPC_SLACK_BYTES:
            raise PayloadTooLarge(inputs, max_payload_bytes, row=0)
    else:
        worst = int(np.argmax(inputs)) if n else 0
        if n and int(inputs[worst]) > max_payload_bytes - IPC_SLACK_BYTES:
            raise PayloadTooLarge(int(inputs[worst]), max_payload_bytes, row=worst)
    sizes = row_bytes(table, out_row_bytes)
    if isinstance(sizes, int):
        step = min(max_rows, max(1, budget // sizes))
        return [(start, min(step, n - start)) for start in range(0, n, step)]
    # Greedy over the prefix sums: each chunk takes the most rows that fit its budget.
    ends = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    out, start = [], 0
    while start < n:
        stop = int(np.searchsorted(ends, ends[start] + budget, side="right")) - 1
        stop = min(max(stop, start + 1), start + max_rows, n)
        out.append((start, stop - start))
        start = stop
    return out
