"""Tensor schemas and the conversions between user data, Arrow columns and numpy.

An input of per-row shape ``()`` is a plain Arrow column; any other shape travels as
one ``fixed_size_list`` column of the flattened row, which decodes to a contiguous
``(N, *shape)`` numpy array without a copy; strings too (skl2onnx's text input ``[None, 1]``
is ``fixed_size_list<string, 1>``, and the client takes one value per row for it). Dtypes are never changed silently: a
lossless (``safe``) cast is the most the client does unless asked.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from hetbatch.producers.errors import SchemaMismatch
from hetbatch.producers.protocol import ragged

__all__ = [
    "CastRule",
    "TensorSpec",
    "arrays_to_table",
    "table_to_arrays",
    "to_arrays",
    "to_table",
    "unwrap_tensors",
]

CastRule = Literal["no", "safe", "same_kind", "unsafe"]

_ARROW_TYPES: dict[str, pa.DataType] = {
    "float16": pa.float16(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "int8": pa.int8(),
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "uint8": pa.uint8(),
    "bool": pa.bool_(),
    "string": pa.string(),
}


@dataclass(frozen=True)
class TensorSpec:
    """One named model input or output.

    Attributes:
        name: the input's name in the model (ONNX input name, keras input name, ...).
        dtype: numpy dtype name, or ``"string"``.
        shape: per-row shape, without the batch axis: ``()`` scalar, ``(30,)`` vector.
        columns: flat source columns the client packs into this input when the data
            has no column named ``name`` (e.g. the feature columns of a Parquet file).
        max_length, pad, lengths, mask: for a first size of ``-1`` (a ragged input, rows of
            any length, ``producers.protocol.ragged``): the longest row allowed, the padding
            value, the model inputs that get each row's length (int64) and the attention
            mask (int64, 1 on elements, 0 on padding) of each call padded to its longest row.
    """

    name: str
    dtype: str
    shape: tuple[int, ...] = ()
    columns: tuple[str, ...] | None = None
    max_length: int | None = None
    pad: float = 0.0
    lengths: str | None = None
    mask: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in _ARROW_TYPES:
            raise ValueError(f"{self.name}: unsupported dtype {self.dtype!r}; use one of {sorted(_ARROW_TYPES)}")
        sizes = self.shape[1:] if self.ragged else self.shape
        if any(d <= 0 for d in sizes):
            raise ValueError(f"{self.name}: shape {self.shape}: sizes must be positive (-1 first only: ragged rows)")
        if self.ragged and (self.dtype == "string" or self.columns is not None):
            raise ValueError(f"{self.name}: a variable-length input holds numbers and comes from one column")
        if not self.ragged and (self.lengths or self.mask or self.max_length is not None):
            raise ValueError(f"{self.name}: lengths, mask and max_length apply to a shape starting with -1 only")
        if (self.max_length or 1) <= 0:
            raise ValueError(f"{self.name}: max_length must be positive")
        if self.columns is not None and len(self.columns) != self.size:
            raise ValueError(f"{self.name}: {len(self.columns)} columns given for shape {self.shape}")

    @property
    def ragged(self) -> bool:
        """Rows of variable length (a first size of -1)."""
        return bool(self.shape) and self.shape[0] == -1

    @property
    def size(self) -> int:
        """Values per row; for a ragged input, per element of a row."""
        return math.prod(self.shape[1:] if self.ragged else self.shape)

    @property
    def arrow_type(self) -> pa.DataType:
        value = _ARROW_TYPES[self.dtype]
        if self.ragged:
            return pa.list_(value if len(self.shape) == 1 else pa.list_(value, self.size))
        return value if not self.shape else pa.list_(value, self.size)

    def describe(self) -> str:
        return f"{self.dtype}{list(self.shape)}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.columns is not None:
            out["columns"] = list(self.columns)
        for key in ("max_length", "lengths", "mask"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.pad:
            out["pad"] = self.pad
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorSpec:
        cols = data.get("columns")
        return cls(
            name=str(data["name"]),
            dtype=str(data["dtype"]),
            shape=tuple(int(d) for d in data.get("shape", ())),
            columns=tuple(str(c) for c in cols) if cols is not None else None,
            max_length=int(data["max_length"]) if data.get("max_length") is not None else None,
            pad=float(data.get("pad", 0.0)),
            lengths=str(data["lengths"]) if data.get("lengths") else None,
            mask=str(data["mask"]) if data.get("mask") else None,
        )


def _arrow_dtype_name(t: pa.DataType) -> str:
    """The numpy name of an Arrow value type (``float64``, not Arrow's ``double``)."""
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    try:
        return str(np.dtype(t.to_pandas_dtype()).name)
    except (NotImplementedError, TypeError):
        return str(t)


def _describe_arrow(t: pa.DataType) -> str:
    if isinstance(t, pa.FixedShapeTensorType):
        return f"{_arrow_dtype_name(t.value_type)}{list(t.shape)}"
    if pa.types.is_fixed_size_list(t):
        return f"{_arrow_dtype_name(t.value_type)}[{t.list_size}]"
    return _arrow_dtype_name(t)


def _fits(t: pa.DataType, spec: TensorSpec) -> bool:
    """Exactly the spec's type: its fixed-size list, or a row-major fixed_shape_tensor of its shape."""
    if isinstance(t, pa.FixedShapeTensorType):
        row_major = not t.permutation or list(t.permutation) == list(range(len(t.shape)))
        return row_major and tuple(t.shape) == spec.shape and t.storage_type == spec.arrow_type
    return bool(t == spec.arrow_type)


_DTYPE_NAMES: dict[np.dtype[Any], str] = {}


def _dtype_name(dtype: np.dtype[Any]) -> str:
    # numpy builds dtype.name anew on each access (~10 us): cache it, small jobs pay it per job.
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = "string" if dtype.kind in "OUT" else dtype.name
    return name


def _cast(arr: np.ndarray, spec: TensorSpec, cast: CastRule) -> np.ndarray:
    got = _dtype_name(arr.dtype)
    if got == spec.dtype:
        return arr
    if spec.dtype == "string" or got == "string" or not np.can_cast(arr.dtype, spec.dtype, cast):
        raise SchemaMismatch(
            f"dtype {got} cannot be cast to {spec.dtype} under cast={cast!r}"
            + ("" if cast == "unsafe" else "; convert it first or pass cast='unsafe' if the loss is intended"),
            column=spec.name,
            expected=spec.describe(),
            received=f"{got}{list(arr.shape[1:])}",
        )
    return arr.astype(spec.dtype)


def _column_values(col: pa.ChunkedArray | pa.Array, spec: TensorSpec, cast: CastRule) -> np.ndarray:
    """Arrow column -> (N, *shape) numpy array (zero-copy where the type already fits)."""
    if isinstance(col, pa.ChunkedArray):
        # combine_chunks copies even a single chunk: avoid it on the hot path.
        arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    else:
        arr = col
    if isinstance(arr.type, pa.FixedShapeTensorType):
        arr = arr.storage
    if spec.ragged:
        return ragged.from_arrow(arr, spec, lambda values: _cast(values, spec, cast))
    if arr.null_count:
        raise SchemaMismatch(f"{arr.null_count} null values", column=spec.name, expected="no nulls", received="nulls")
    t = arr.type
    if pa.types.is_fixed_size_list(t):
        if not spec.shape or t.list_size != spec.size:
            raise SchemaMismatch("wrong width", column=spec.name, expected=spec.describe(), received=_describe_arrow(t))
        flat = arr.flatten()
        if flat.null_count:
            raise SchemaMismatch("null values inside rows", column=spec.name, expected="no nulls", received="nulls")
        values = flat.to_numpy(zero_copy_only=False).reshape((len(arr), *spec.shape))
    elif pa.types.is_list(t) or pa.types.is_large_list(t):
        lengths = arr.value_lengths().to_numpy(zero_copy_only=False)
        if not spec.shape or (lengths != spec.size).any():
            raise SchemaMismatch(
                "rows of the wrong length", column=spec.name, expected=spec.describe(), received=str(t)
            )
        values = arr.flatten().to_numpy(zero_copy_only=False).reshape((len(arr), *spec.shape))
    else:
        if spec.shape and spec.size != 1:  # one value per row (a text column) fits a shape of (1,)
            raise SchemaMismatch(
                "a scalar column was given for a tensor input",
                column=spec.name,
                expected=spec.describe(),
                received=_describe_arrow(t),
            )
        values = arr.to_numpy(zero_copy_only=False).reshape((len(arr), *spec.shape))
    return _cast(values, spec, cast)


def _stack_columns(table: pa.Table, spec: TensorSpec, cast: CastRule) -> np.ndarray:
    assert spec.columns is not None
    out = np.empty((table.num_rows, spec.size), dtype=object if spec.dtype == "string" else spec.dtype)
    scalar = TensorSpec(spec.name, spec.dtype)
    for j, name in enumerate(spec.columns):
        try:
            out[:, j] = _column_values(table.column(name), scalar, cast)
        except SchemaMismatch as exc:
            raise SchemaMismatch(f"feature column {name!r}: {exc}", column=spec.name, expected=spec.describe()) from exc
    return out.reshape((table.num_rows, *spec.shape))


def _as_table(data: Any, inputs: Sequence[TensorSpec]) -> pa.Table | dict[str, np.ndarray]:
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, np.ndarray):
        if len(inputs) != 1:
            raise SchemaMismatch(
                f"a bare array was given but the model has {len(inputs)} inputs; pass a dict of arrays"
            )
        return {inputs[0].name: data}
    if isinstance(data, Mapping):
        return {str(k): ragged.as_column(v) for k, v in data.items()}
    if type(data).__module__.startswith("pandas"):
        return _from_pandas(data)
    raise SchemaMismatch(
        f"unsupported input type {type(data).__name__}; pass a pyarrow Table or RecordBatch, "
        "a pandas DataFrame, a dict of numpy arrays or a 2-D numpy array"
    )


def _from_pandas(frame: Any) -> pa.Table:
    """A DataFrame as a table in which a NaN of a float column stays a NaN value, as in a
    numpy array or an Arrow column, so the model's ``nan`` policy judges it the same way;
    Arrow's pandas conversion would make it a null, refused whatever the policy. Only
    pandas' own missing markers (None, ``pd.NA``, NaT) become nulls."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    for i in range(frame.shape[1]):
        values = frame.iloc[:, i]
        if isinstance(values.dtype, np.dtype) and values.dtype.kind == "f":
            field = table.schema.field(i)
            table = table.set_column(i, field, pa.array(values.to_numpy(), type=field.type))
    return table


def _input_array(data: pa.Table | dict[str, np.ndarray], spec: TensorSpec, cast: CastRule) -> np.ndarray:
    if isinstance(data, dict):
        if spec.name in data:
            arr = data[spec.name]
            if spec.ragged:
                return ragged.from_values(arr, spec, lambda values: _cast(values, spec, cast))
            if arr.ndim == 1 and spec.shape and spec.size == 1:  # one value per row: (N,) is (N, 1)
                arr = arr.reshape((len(arr), *spec.shape))
            if arr.shape[1:] != spec.shape:
                got = f"{_dtype_name(arr.dtype)}{list(arr.shape[1:])}"
                raise SchemaMismatch("wrong shape", column=spec.name, expected=spec.describe(), received=got)
            return _cast(arr, spec, cast)
        if spec.columns and all(c in data for c in spec.columns):
            cols = [_cast(np.asarray(data[c]), TensorSpec(c, spec.dtype), cast) for c in spec.columns]
            return np.stack(cols, axis=1).reshape((len(cols[0]), *spec.shape))
        raise SchemaMismatch(
            f"missing input; got {sorted(data)}", column=spec.name, expected=spec.describe(), received="no such input"
        )
    if spec.name in data.column_names:
        return _column_values(data.column(spec.name), spec, cast)
    if spec.columns and all(c in data.column_names for c in spec.columns):
        return _stack_columns(data, spec, cast)
    missing = [c for c in spec.columns or () if c not in data.column_names]
    hint = f"; missing feature columns {missing[:5]}" if missing else ""
    raise SchemaMismatch(
        f"missing input column{hint}; got {data.column_names[:10]}",
        column=spec.name,
        expected=spec.describe(),
        received="no such column",
    )


def to_arrays(data: Any, inputs: Sequence[TensorSpec], *, cast: CastRule = "safe") -> dict[str, np.ndarray]:
    """Convert user data to the model's named input arrays, (N, *shape) each.

    Raises:
        SchemaMismatch: an input is missing, has the wrong shape, nulls, or a dtype that
            cannot be cast under ``cast``.
    """
    source = _as_table(data, inputs)
    arrays = {spec.name: _input_array(source, spec, cast) for spec in inputs}
    rows = {len(a) for a in arrays.values()}
    if len(rows) > 1:
        raise SchemaMismatch(f"inputs have different row counts: { {k: len(v) for k, v in arrays.items()} }")
    return arrays


def to_table(data: Any, inputs: Sequence[TensorSpec], *, cast: CastRule = "safe") -> pa.Table:
    """Convert user data to the wire table of a model: one column per input.

    Raises:
        SchemaMismatch: as ``to_arrays``.
    """
    return arrays_to_table(to_arrays(data, inputs, cast=cast))


def table_to_arrays(table: pa.Table, inputs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """Worker side: wire table -> model inputs, with exact dtypes (no cast at all).

    Raises:
        SchemaMismatch: a column is missing or differs from the spec in type or width.
    """
    out: dict[str, np.ndarray] = {}
    for spec in inputs:
        if spec.name not in table.column_names:
            raise SchemaMismatch(
                f"missing input column; got {table.column_names[:10]}",
                column=spec.name,
                expected=spec.describe(),
                received="no such column",
            )
        col = table.column(spec.name)
        if not _fits(col.type, spec):
            raise SchemaMismatch(
                "wrong dtype or shape; the worker never casts, convert it on the producer side",
                column=spec.name,
                expected=spec.describe(),
                received=_describe_arrow(col.type),
            )
        out[spec.name] = _column_values(col, spec, "no")
    return out


def _to_arrow(arr: np.ndarray) -> tuple[pa.Array, dict[bytes, bytes] | None]:
    if ragged.is_rows(arr):
        return ragged.to_arrow(arr), None
    if arr.dtype.kind in "OUT":
        flat: pa.Array = pa.array(arr.reshape(-1).tolist(), type=pa.string())
    else:
        flat = pa.array(np.ascontiguousarray(arr).reshape(-1))
    if arr.ndim <= 1:
        return flat, None
    size = math.prod(arr.shape[1:])
    meta = {b"shape": json.dumps(list(arr.shape[1:])).encode()} if arr.ndim > 2 else None
    return pa.FixedSizeListArray.from_arrays(flat, size), meta


def arrays_to_table(arrays: Mapping[str, np.ndarray]) -> pa.Table:
    """Named (N, ...) arrays -> Arrow table; >2-D rows keep their shape in field metadata."""
    fields, columns = [], []
    for name, arr in arrays.items():
        arr = np.asarray(arr)
        if arr.ndim == 0:
            raise SchemaMismatch("a model output has no batch axis", column=name)
        col, meta = _to_arrow(arr)
        fields.append(pa.field(name, col.type, nullable=False, metadata=meta))
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def unwrap_tensors(table: pa.Table) -> pa.Table:
    """Turn columns carrying a ``shape`` in field metadata into fixed_shape_tensor columns."""
    if not any(f.metadata and b"shape" in f.metadata for f in table.schema):
        return table
    cols, fields = [], []
    for f, col in zip(table.schema, table.columns):
        if f.metadata and b"shape" in f.metadata:
            shape = json.loads(f.metadata[b"shape"])
            ext = pa.fixed_shape_tensor(f.type.value_type, shape)
            col = pa.chunked_array([pa.ExtensionArray.from_storage(ext, c) for c in col.chunks], type=ext)
            f = pa.field(f.name, ext)
        cols.append(col)
        fields.append(f)
    return pa.Table.from_arrays(cols, schema=pa.schema(fields, metadata=table.schema.metadata))
