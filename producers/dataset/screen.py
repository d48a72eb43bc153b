"""Row-level input checks for dataset runs: which rows a model cannot take, and why.

``Client.submit`` validates whole columns: one null refuses the job. A dataset run
screens each batch first, row by row, so that it can name the file, row and column of
the first bad row (``--on-error fail``) or set bad rows aside with their reason and
score the others (``--on-error quarantine``). The checks, in the order a row's reason
is taken from:

- ``NullValue``: a null in a feature column, a null list, or a null inside a list;
- ``WrongShape``: a list column whose row has another number of values than the input's shape;
- ``LossyCast``: (quarantine only) a value that changes when cast to the input's dtype,
  such as 16,777,217 as float32; under ``--on-error fail`` a dtype the cast rule refuses
  fails the whole column, as ``Client.submit`` does;
- ``NonFinite``: NaN or infinity in a float input of a model registered with ``nan = "reject"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hetbatch.producers.errors import SchemaMismatch
from hetbatch.producers.protocol.schema import CastRule, TensorSpec

__all__ = ["ERROR_COLUMNS", "Screened", "screen"]

ERROR_COLUMNS = ("hetbatch_row", "hetbatch_error_type", "hetbatch_error_column", "hetbatch_error_message")


@dataclass
class Screened:
    """A batch after screening.

    Attributes:
        good: per-row mask of the rows the model takes.
        inputs: the model's inputs for the good rows only, in their exact dtypes.
        bad_rows: positions (in the batch) of the rejected rows, ascending.
        kinds, columns, messages: the first reason of each rejected row.
    """

    good: np.ndarray
    inputs: dict[str, np.ndarray]
    bad_rows: np.ndarray
    kinds: list[str]
    columns: list[str]
    messages: list[str]

    @property
    def rejected(self) -> int:
        return len(self.bad_rows)


class _Reasons:
    """The first reason per row: later checks never overwrite an earlier one.

    The per-row arrays are made when the first bad row is found: a clean batch (the
    common case) pays for none of them.
    """

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.seen = False
        self.kind = self.column = self.message = np.empty(0, dtype=object)

    def _make(self) -> None:
        if not self.seen:
            self.seen = True
            self.kind, self.column, self.message = (np.full(self.rows, "", dtype=object) for _ in range(3))

    def good(self) -> np.ndarray:
        return self.kind == "" if self.seen else np.ones(self.rows, dtype=bool)

    def of(self, rows: np.ndarray) -> tuple[list[str], list[str], list[str]]:
        """The (kinds, columns, messages) of ``rows``."""
        if not self.seen:
            return [], [], []
        kinds, columns, messages = ([str(v) for v in a[rows]] for a in self._all())
        return kinds, columns, messages

    def _all(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.kind, self.column, self.message

    def add(self, mask: np.ndarray, kind: str, column: str, message: str) -> None:
        if not mask.any():
            return
        self._make()
        new = mask & (self.kind == "")
        self.kind[new] = kind
        self.column[new] = column
        self.message[new] = message

    def merge(self, where: np.ndarray, sub: _Reasons) -> None:
        """Take ``sub``'s reasons (one per row of ``where``) for rows that have none yet."""
        if not sub.seen:
            return
        self._make()
        empty = self.kind[where] == ""
        for mine, theirs in zip(self._all(), sub._all(), strict=True):
            mine[where] = np.where(empty, theirs, mine[where])


def _values(arr: pa.Array, dtype: str) -> np.ndarray:
    """Arrow values as numpy, nulls filled so every row has a placeholder value."""
    if arr.null_count:
        arr = pc.fill_null(arr, "" if dtype == "string" or pa.types.is_string(arr.type) else 0)
    return np.asarray(arr.to_numpy(zero_copy_only=False))


def _cast(
    values: np.ndarray, spec: TensorSpec, column: str, cast: CastRule, lossy_rows: bool, reasons: _Reasons
) -> np.ndarray:
    """``values`` in the spec's dtype; rows a value-changing cast would alter are rejected in quarantine."""
    target = np.dtype(object) if spec.dtype == "string" else np.dtype(spec.dtype)
    got = "string" if values.dtype.kind in "OUT" else values.dtype.name
    if got == spec.dtype:
        return values
    numeric = got != "string" and spec.dtype != "string"
    if numeric and np.can_cast(values.dtype, target, cast):
        return values.astype(target)
    if not numeric:
        raise SchemaMismatch(f"dtype {got} cannot be cast to {spec.dtype}", column=column, expected=spec.dtype)
    with np.errstate(all="ignore"):
        out = values.astype(target)
        back = out.astype(values.dtype)
    changed = back != values
    if values.dtype.kind == "f":
        changed &= ~(np.isnan(values) & np.isnan(back))
    row_changed = changed.reshape(len(values), -1).any(axis=1)
    if not lossy_rows:
        first = (
            f"; the first value that would change is in row {int(np.argmax(row_changed))}" if row_changed.any() else ""
        )
        raise SchemaMismatch(
            f"dtype {got} cannot be cast to {spec.dtype} under cast={cast!r}{first}; convert it first, "
            "pass --cast unsafe if the loss is intended, or --on-error quarantine to set such rows aside",
            column=column,
        )
    reasons.add(row_changed, "LossyCast", column, f"value changes when cast from {got} to {spec.dtype}")
    return out


def _scalar(
    col: pa.Array, spec: TensorSpec, column: str, cast: CastRule, lossy_rows: bool, reasons: _Reasons
) -> np.ndarray:
    if col.null_count:
        reasons.add(np.asarray(col.is_null().to_numpy(zero_copy_only=False)), "NullValue", column, "null value")
    return _cast(_values(col, spec.dtype), spec, column, cast, lossy_rows, reasons)


def _tensor(col: pa.Array, spec: TensorSpec, cast: CastRule, lossy_rows: bool, reasons: _Reasons) -> np.ndarray:
    """A list or fixed-size-list column -> (N, *shape), rows of the wrong length rejected."""
    name, rows = spec.name, len(col)
    if isinstance(col.type, pa.FixedShapeTensorType):
        col = col.storage
    t = col.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        raise SchemaMismatch("a scalar column was given for a tensor input", column=name, expected=spec.describe())
    null_row = np.asarray(col.is_null().to_numpy(zero_copy_only=False))
    reasons.add(null_row, "NullValue", name, "null list")
    lengths = np.asarray(_values(pc.list_value_length(col), "int64"), dtype=np.int64)
    wrong = ~null_row & (lengths != spec.size)
    if wrong.any():
        for n in np.unique(lengths[wrong]):  # one message per length seen, not per row
            reasons.add(
                wrong & (lengths == n), "WrongShape", name, f"{n} values, expected {spec.size} ({spec.describe()})"
            )
    fits = ~(null_row | wrong)
    out = np.zeros((rows, spec.size), dtype=object if spec.dtype == "string" else spec.dtype)
    if fits.any():
        flat = pc.list_flatten(col.filter(pa.array(fits)))
        sub = _Reasons(int(fits.sum()))
        if flat.null_count:
            nulls = np.asarray(flat.is_null().to_numpy(zero_copy_only=False)).reshape(-1, spec.size)
            inner = np.asarray(nulls.any(axis=1), dtype=bool)
            sub.add(inner, "NullValue", name, "null value inside the row")
        out[fits] = _cast(_values(flat, spec.dtype).reshape(-1, spec.size), spec, name, cast, lossy_rows, sub)
        reasons.merge(fits, sub)
    return out.reshape((rows, *spec.shape))


def screen(
    batch: pa.RecordBatch | pa.Table,
    inputs: Sequence[TensorSpec],
    *,
    nan: str = "pass",
    cast: CastRule = "safe",
    lossy_rows: bool = False,
) -> Screened:
    """Check every row of ``batch`` against the model's inputs.

    Args:
        batch: the rows, with a column per input or the input's feature columns.
        inputs: the model's input specs.
        nan: ``reject`` to refuse NaN and infinity in float inputs.
        cast: how far dtypes may be converted (as ``Client.submit``).
        lossy_rows: judge a refused cast value by value (quarantine) instead of refusing the column.

    Raises:
        SchemaMismatch: a problem of a whole column (missing, a dtype that cannot be cast).
    """
    table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
    rows = table.num_rows
    reasons = _Reasons(rows)
    arrays: dict[str, np.ndarray] = {}
    for spec in inputs:
        if spec.name in table.column_names:
            col = table.column(spec.name).combine_chunks()
            if spec.shape:
                arrays[spec.name] = _tensor(col, spec, cast, lossy_rows, reasons)
            else:
                arrays[spec.name] = _scalar(col, spec, spec.name, cast, lossy_rows, reasons)
        elif spec.columns and all(c in table.column_names for c in spec.columns):
            values = [
                _scalar(table.column(c).combine_chunks(), spec, c, cast, lossy_rows, reasons) for c in spec.columns
            ]
            arrays[spec.name] = np.stack(values, axis=1).reshape((rows, *spec.shape))
        else:
            missing = [c for c in spec.columns or (spec.name,) if c not in table.column_names]
            raise SchemaMismatch(f"missing input column(s) {missing[:5]}", column=spec.name, expected=spec.describe())
        if nan == "reject" and spec.dtype.startswith("float"):
            flat = arrays[spec.name].reshape(rows, -1)
            if not np.isfinite(flat).all():  # the whole batch first: a row-by-row pass costs 15x
                finite = np.isfinite(flat)
                bad: np.ndarray = ~finite.all(axis=1)
                where = np.asarray(spec.columns)[np.argmax(~finite, axis=1)] if spec.columns else None
                for column in np.unique(where[bad]) if where is not None else [spec.name]:
                    mask = bad & (where == column) if where is not None else bad
                    reasons.add(mask, "NonFinite", str(column), "NaN or infinity, and the model rejects them")
    good = reasons.good()
    bad_rows = np.flatnonzero(~good)
    if len(bad_rows):
        arrays = {name: a[good] for name, a in arrays.items()}
    return Screened(
        good,
        arrays,
        bad_rows,
        *reasons.of(bad_rows),
    )
