"""Pure parts of any-row-size support: chunking by bytes, ragged columns on the wire, and
the length-aware ragged call (grouping by length never reorders answers)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pytest

from hetbatch.producers.chunking import chunk_bounds
from hetbatch.producers.errors import PayloadError, PayloadTooLarge
from hetbatch.producers.protocol.ipc import check_type
from hetbatch.producers.protocol.model import ModelSpec
from hetbatch.producers.protocol.schema import TensorSpec, table_to_arrays, to_table
from hetbatch.producers.protocol.wire import decode_table, encode_table
from hetbatch.worker.ragged import RaggedCall

MiB = 1 << 20


def test_wide_rows_are_cut_by_bytes_before_rows() -> None:
    images = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(100 * 1000, np.float32)), 1000)})
    bounds = chunk_bounds(images, max_rows=65_536, max_bytes=40_000, max_payload_bytes=256 * MiB)
    assert bounds == [(0, 10), (10, 10), (20, 10), (30, 10), (40, 10), (50, 10), (60, 10), (70, 10), (80, 10), (90, 10)]


def test_expected_output_bytes_cut_chunks_too() -> None:
    narrow = pa.table({"x": pa.array(np.zeros(100, np.float32))})
    bounds = chunk_bounds(narrow, max_rows=65_536, max_bytes=4_000, max_payload_bytes=MiB, out_row_bytes=1_000)
    assert [rows for _, rows in bounds] == [4] * 25


def test_variable_rows_are_counted_one_by_one_and_keep_their_order() -> None:
    rows = [np.zeros(n, np.int64) for n in (1, 100, 1, 1, 100, 1)]
    table = to_table({"ids": rows}, [TensorSpec("ids", "int64", (-1,))])
    # 12 bytes for a 1-token row (8 + its 4-byte offset), 804 for a 100-token row
    assert chunk_bounds(table, max_rows=100, max_bytes=820, max_payload_bytes=MiB) == [(0, 2), (2, 2), (4, 2)]
    assert chunk_bounds(table, max_rows=3, max_bytes=900, max_payload_bytes=MiB) == [(0, 3), (3, 3)]


def test_only_a_row_too_big_for_a_payload_fails_naming_it() -> None:
    rows = [np.zeros(n, np.int64) for n in (3, 200_000, 3)]
    table = to_table({"ids": rows}, [TensorSpec("ids", "int64", (-1,))])
    with pytest.raises(PayloadTooLarge, match=r"row 1 of the input is 1600004 bytes"):
        chunk_bounds(table, max_rows=100, max_bytes=1_000, max_payload_bytes=MiB)


def test_text_of_shape_1_travels_as_a_fixed_size_list_of_strings() -> None:
    spec = TensorSpec("text", "string", (1,))
    docs = ["café 東京", "", "a,b"]
    table = to_table({"text": docs}, [spec])  # one string per row fills the (1,) shape
    assert table.column("text").type == pa.list_(pa.string(), 1)
    back = table_to_arrays(decode_table(encode_table(table)), [spec])["text"]
    assert back.shape == (3, 1) and back[:, 0].tolist() == docs
    # counted by its characters: 4 bytes of offset + the UTF-8 length of each row's string
    assert chunk_bounds(table, max_rows=10, max_bytes=16, max_payload_bytes=MiB) == [(0, 1), (1, 2)]  # 16, 4 + 7


@pytest.mark.parametrize(
    "t",
    [pa.list_(pa.string()), pa.list_(pa.list_(pa.string(), 2)), pa.large_string(), pa.list_(pa.list_(pa.int64()))],
)
def test_the_wire_refuses_strings_in_variable_rows_and_deeper_lists(t: pa.DataType) -> None:
    with pytest.raises(PayloadError, match=r"column 'c' has type .* which the wire does not carry"):
        check_type("c", t)


def test_ragged_rows_travel_unpadded_and_come_back_as_row_views() -> None:
    spec = TensorSpec("seq", "float32", (-1, 2), max_length=10)
    rows = [np.full((n, 2), n, np.float32) for n in (3, 1, 7)]
    blob = encode_table(to_table({"seq": rows}, [spec]))
    table = decode_table(blob, max_bytes=MiB, max_rows=3)
    assert table.schema.field("seq").type == pa.list_(pa.list_(pa.float32(), 2))
    got = table_to_arrays(table.slice(1), [spec])["seq"]
    assert [r.shape for r in got] == [(1, 2), (7, 2)]
    np.testing.assert_array_equal(got[1], rows[2])


def _spec(**ids: object) -> ModelSpec:
    return ModelSpec(
        name="m",
        framework="onnx",
        artifact="/x",
        sha256="0",
        inputs=(TensorSpec("ids", "int64", (-1,), lengths="n", **ids),),  # type: ignore[arg-type]
        outputs=("hidden", "total"),
        ragged_outputs=("hidden",),
    )


def _model(calls: list[tuple[int, int]]) -> object:
    def predict(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, n = inputs["ids"], inputs["n"]
        calls.append(ids.shape)
        valid = np.arange(ids.shape[1])[None, :] < n[:, None]
        return {"hidden": ids * 2, "total": (ids * valid).sum(1)}

    return predict


def test_the_ragged_call_groups_by_length_and_answers_in_row_order() -> None:
    rng = np.random.default_rng(0)
    col = np.empty(200, dtype=object)
    for i, n in enumerate(rng.integers(1, 100, 200)):
        col[i] = rng.integers(1, 9, int(n))
    calls: list[tuple[int, int]] = []
    call = RaggedCall(_model(calls), _spec(pad=-1), max_rows=16, max_bytes=1 << 30)  # type: ignore[arg-type]
    out = call({"ids": col})
    assert max(rows for rows, _ in calls) == 16 and len(calls) == 13
    for i, row in enumerate(col):
        np.testing.assert_array_equal(out["hidden"][i], row * 2)
        assert out["total"][i] == row.sum()
    padded = call.take_padded_fraction()
    assert padded is not None and padded < 0.1  # sorted: each call's rows have similar lengths
    assert call.take_padded_fraction() is None


def test_the_ragged_call_keeps_padded_bytes_within_its_budget() -> None:
    col = np.empty(8, dtype=object)
    for i in range(8):
        col[i] = np.ones(100, np.int64)
    calls: list[tuple[int, int]] = []
    RaggedCall(_model(calls), _spec(), max_rows=64, max_bytes=2_500)({"ids": col})  # type: ignore[arg-type]
    assert calls == [(3, 100), (3, 100), (2, 100)]  # 808 bytes per padded row


def test_the_byte_budget_admits_in_order_and_a_task_over_it_alone() -> None:
    import threading
    import time

    from hetbatch.worker.budget import ByteBudget

    budget, seen = ByteBudget(100), []

    def task(nbytes: int) -> None:
        with budget.hold(nbytes):
            seen.append((nbytes, budget.used))
            time.sleep(0.05)

    threads = [threading.Thread(target=task, args=(n,)) for n in (60, 60, 300, 10, 10)]
    for i, t in enumerate(threads):
        t.start()
        while budget._tickets <= i:  # arrived (took its ticket) before the next starts
            time.sleep(0.001)
    for t in threads:
        t.join()
    # 60 waits for 60 (120 > 100); 300 runs alone; the small ones wait behind it (no starving).
    assert seen == [(60, 60), (60, 60), (300, 300), (10, 10), (10, 20)]
    assert budget.used == 0 and budget.take_peak() == 300
