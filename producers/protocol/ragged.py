"""Variable-length rows: token ids of shape ``[-1]``, or ``[-1, 5]`` feature sequences.

On the wire a ragged input is one Arrow list column (``list<int64>``, or
``list<fixed_size_list<float32, 5>>``): offsets and the concatenated values, no padding.
In numpy, on both sides, it is an object array of N per-row arrays of shape
``(length, *inner)``: slicing, ``np.concatenate`` and the batcher's merge/split work on
it unchanged, and each row is a view into the decoded values (no copy). Padding to a
batch happens only at the model call (``worker.ragged``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from hetbatch.producers.errors import SchemaMismatch

if TYPE_CHECKING:  # schema imports this module: the names are for annotations only
    from hetbatch.producers.protocol.schema import TensorSpec

Convert = Callable[[np.ndarray], np.ndarray]
"""Casts values to the spec's dtype under the caller's cast rule (``schema._cast``)."""

__all__ = ["MAX_ELEMENTS", "as_column", "from_arrow", "from_values", "is_rows", "lengths_of", "to_arrow"]

MAX_ELEMENTS = (1 << 31) - 1
"""Most values of one ragged column in one payload (``list`` has 32-bit offsets)."""


def is_rows(arr: np.ndarray) -> bool:
    """Whether ``arr`` is an object array of per-row arrays (a ragged column)."""
    return arr.dtype.kind == "O" and len(arr) > 0 and isinstance(arr.flat[0], np.ndarray)


def as_column(value: Any) -> np.ndarray:
    """A user's column as numpy: rows of different lengths become an object array of rows."""
    if isinstance(value, np.ndarray):
        return value
    try:
        return np.asarray(value)
    except ValueError:  # inhomogeneous: a list of sequences of different lengths
        rows = list(value)
        out = np.empty(len(rows), dtype=object)
        for i, row in enumerate(rows):
            out[i] = np.asarray(row)
        return out


def lengths_of(rows: np.ndarray) -> np.ndarray:
    """Length of each row of a ragged column (int64)."""
    return np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))


def _check_lengths(lengths: np.ndarray, spec: TensorSpec) -> None:
    if not len(lengths):
        return
    empty = np.flatnonzero(lengths <= 0)
    if len(empty):
        raise SchemaMismatch(
            f"row {int(empty[0])} is an empty sequence ({len(empty)} such rows); every row needs at least "
            "one element: drop or fill those rows",
            column=spec.name,
            expected=spec.describe(),
            received="0 elements",
        )
    if spec.max_length is not None:
        long = np.flatnonzero(lengths > spec.max_length)
        if len(long):
            row = int(long[0])
            raise SchemaMismatch(
                f"row {row} has {int(lengths[row])} elements, over max_length={spec.max_length} "
                f"({len(long)} such rows); truncate them first",
                column=spec.name,
                expected=spec.describe(),
                received=f"{int(lengths[row])} elements",
            )


def from_values(arr: np.ndarray, spec: TensorSpec, convert: Convert) -> np.ndarray:
    """Client side: a user's ragged column (object array of rows, or a dense (N, L, ...)
    array whose rows all have length L) as an object array of rows of the spec's dtype.

    Raises:
        SchemaMismatch: a row has the wrong inner shape, a dtype that cannot be cast, is
            empty, or is longer than ``max_length``.
    """
    inner = spec.shape[1:]
    if arr.dtype.kind != "O":  # every row has the same length
        if arr.ndim != 1 + len(spec.shape) or arr.shape[2:] != inner:
            raise SchemaMismatch(
                "wrong shape", column=spec.name, expected=spec.describe(), received=f"{arr.dtype}{list(arr.shape[1:])}"
            )
        arr = convert(arr)
        out = np.empty(len(arr), dtype=object)
        for i in range(len(arr)):
            out[i] = arr[i]
    else:
        out = np.empty(len(arr), dtype=object)
        for i, row in enumerate(arr):
            row = np.asarray(row)
            if row.ndim != len(spec.shape) or row.shape[1:] != inner:
                raise SchemaMismatch(
                    f"row {i} has shape {list(row.shape)}",
                    column=spec.name,
                    expected=spec.describe(),
                    received=f"{row.dtype}{list(row.shape)}",
                )
            out[i] = convert(row)
    _check_lengths(lengths_of(out), spec)
    return out


def from_arrow(arr: pa.Array, spec: TensorSpec, convert: Convert) -> np.ndarray:
    """A list column as an object array of row views into its values (both sides).

    Raises:
        SchemaMismatch: not a list column of the spec's inner shape, nulls, an empty or
            over-long row, or a dtype that ``convert`` refuses.
    """
    t = arr.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
        raise SchemaMismatch(
            "a column of variable-length rows (an Arrow list) is expected",
            column=spec.name,
            expected=spec.describe(),
            received=str(t),
        )
    inner = spec.shape[1:]
    if arr.null_count:
        raise SchemaMismatch(f"{arr.null_count} null rows", column=spec.name, expected="no nulls", received="nulls")
    lengths = arr.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
    _check_lengths(lengths, spec)
    flat = arr.flatten()  # the values of this (possibly sliced) array's rows only
    if inner:
        if not pa.types.is_fixed_size_list(flat.type) or flat.type.list_size != math.prod(inner):
            raise SchemaMismatch("wrong inner width", column=spec.name, expected=spec.describe(), received=str(t))
        flat = flat.flatten()
    if flat.null_count:
        raise SchemaMismatch("null values inside rows", column=spec.name, expected="no nulls", received="nulls")
    values = convert(flat.to_numpy(zero_copy_only=False).reshape((-1, *inner)))
    out = np.empty(len(lengths), dtype=object)
    start = 0
    for i, n in enumerate(lengths.tolist()):
        out[i] = values[start : start + n]
        start += n
    return out


def to_arrow(rows: Sequence[np.ndarray] | np.ndarray) -> pa.Array:
    """An object array of rows of shape ``(length, *inner)`` as a list column.

    Raises:
        SchemaMismatch: rows of different dtypes or inner shapes, or more than
            ``MAX_ELEMENTS`` values in all.
    """
    rows = list(rows)
    first = np.asarray(rows[0])
    inner = first.shape[1:]
    for i, row in enumerate(rows):
        if row.shape[1:] != inner or row.dtype != first.dtype:
            raise SchemaMismatch(f"row {i} is {row.dtype}{list(row.shape)}, row 0 {first.dtype}{list(first.shape)}")
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    if int(lengths.sum()) > MAX_ELEMENTS:
        raise SchemaMismatch(f"{int(lengths.sum())} values in one ragged column; at most {MAX_ELEMENTS} per chunk")
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate([np.ascontiguousarray(r).reshape(-1) for r in rows])
    flat: pa.Array = pa.array(values)
    if inner:
        flat = pa.FixedSizeListArray.from_arrays(flat, math.prod(inner))
    return pa.ListArray.from_arrays(pa.array(offsets), flat)
