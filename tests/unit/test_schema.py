"""Input conversion and validation, without a broker."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from hetbatch.producers.errors import SchemaMismatch
from hetbatch.producers.protocol.schema import TensorSpec, arrays_to_table, table_to_arrays, to_table, unwrap_tensors

X = TensorSpec("x", "float32", (2, 3))


def test_tensor_inputs_reach_the_model_contiguous_and_unchanged() -> None:
    data = np.arange(24, dtype=np.float32).reshape(4, 2, 3)
    table = to_table({"x": data}, [X])
    assert table.column("x").type == pa.list_(pa.float32(), 6)
    arrays = table_to_arrays(table, [X])
    assert arrays["x"].shape == (4, 2, 3) and arrays["x"].flags.c_contiguous
    np.testing.assert_array_equal(arrays["x"], data)


def test_sliced_tables_decode_the_right_rows() -> None:
    data = np.arange(24, dtype=np.float32).reshape(4, 2, 3)
    table = to_table({"x": data}, [X]).slice(1, 2)
    np.testing.assert_array_equal(table_to_arrays(table, [X])["x"], data[1:3])


def test_safe_casts_only_unless_asked() -> None:
    spec = [TensorSpec("x", "float64", (2,))]
    assert to_table({"x": np.ones((2, 2), np.float32)}, spec).column("x").type.value_type == pa.float64()
    low = [TensorSpec("x", "float32", (2,))]
    with pytest.raises(SchemaMismatch, match="cast='unsafe'"):
        to_table({"x": np.ones((2, 2))}, low)
    assert to_table({"x": np.ones((2, 2))}, low, cast="same_kind").num_rows == 2


def test_the_worker_never_casts() -> None:
    table = to_table({"x": np.ones((2, 6), np.float64)}, [TensorSpec("x", "float64", (6,))])
    with pytest.raises(SchemaMismatch, match="expected float32\\[2, 3\\], received float64\\[6\\]"):
        table_to_arrays(table, [X])


def test_feature_columns_are_packed_by_name_in_spec_order() -> None:
    spec = [TensorSpec("X", "float64", (3,), ("a", "b", "c"))]
    frame = pd.DataFrame({"c": [3.0, 6.0], "key": [1, 2], "a": [1.0, 4.0], "b": [2.0, 5.0]})
    arrays = table_to_arrays(to_table(frame, spec), spec)
    np.testing.assert_array_equal(arrays["X"], [[1, 2, 3], [4, 5, 6]])
    with pytest.raises(SchemaMismatch, match="missing feature columns \\['c'\\]"):
        to_table(frame.drop(columns="c"), spec)


def test_multi_input_row_counts_must_agree() -> None:
    specs = [TensorSpec("a", "float32", (1,)), TensorSpec("b", "float32", (1,))]
    with pytest.raises(SchemaMismatch, match="different row counts"):
        to_table({"a": np.ones((2, 1), np.float32), "b": np.ones((3, 1), np.float32)}, specs)


def test_outputs_keep_their_shape() -> None:
    out = arrays_to_table({"img": np.zeros((2, 4, 5), np.float32), "label": np.array([1, 2])})
    wrapped = unwrap_tensors(out)
    assert wrapped.column("img").combine_chunks().to_numpy_ndarray().shape == (2, 4, 5)
    assert wrapped.column("label").to_pylist() == [1, 2]


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="unsupported dtype"):
        TensorSpec("x", "complex64")
    with pytest.raises(ValueError, match="columns"):
        TensorSpec("x", "float32", (3,), ("a",))
    assert TensorSpec.from_dict(X.to_dict()) == X
