"""How a dataset run cuts a Parquet part into batches: every row once, in order, batches
of the asked size across row groups of any size, and less Arrow memory than
``iter_batches`` for the usual row group; and the row screen's fast paths (a clean
batch, a batch with a NaN) giving the answers of the row-by-row checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hetbatch.producers.dataset import run as dataset_run
from hetbatch.producers.dataset.screen import screen
from hetbatch.producers.protocol.schema import TensorSpec


def _file(tmp_path: Path, rows: int, group: int) -> pq.ParquetFile:
    rng = np.random.default_rng(0)
    table = pa.table({"id": np.arange(rows), "x": rng.random(rows), "y": rng.random(rows).astype(np.float32)})
    pq.write_table(table, tmp_path / "f.parquet", row_group_size=group)
    return pq.ParquetFile(tmp_path / "f.parquet", pre_buffer=False)


@pytest.mark.parametrize(
    ("rows", "group", "batch"), [(10_000, 1_000, 4_096), (10_000, 4_096, 4_096), (9_000, 7_000, 2_000)]
)
@pytest.mark.parametrize("streamed", [False, True])
def test_batches_cover_every_row_once_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rows: int, group: int, batch: int, streamed: bool
) -> None:
    if streamed:  # every group over the whole-read budget: the iter_batches path
        monkeypatch.setattr(dataset_run, "_WHOLE_GROUP_BYTES", 0)
    pf = _file(tmp_path, rows, group)
    batches = list(dataset_run._batches(pf, tuple(range(pf.num_row_groups)), None, batch))
    assert [b.num_rows for b in batches[:-1]] == [batch] * (len(batches) - 1)
    assert 0 < batches[-1].num_rows <= batch
    assert pa.Table.from_batches(batches).equals(pq.read_table(tmp_path / "f.parquet"))


def test_batches_of_some_groups_and_columns(tmp_path: Path) -> None:
    pf = _file(tmp_path, 10_000, 1_000)
    batches = list(dataset_run._batches(pf, (3, 4, 5), ["y"], 1_500))
    assert [b.num_rows for b in batches] == [1_500, 1_500]
    assert batches[0].schema.names == ["y"]
    want = pq.read_table(tmp_path / "f.parquet", columns=["y"]).slice(3_000, 3_000)
    assert pa.Table.from_batches(batches).equals(want)


def test_a_whole_group_read_holds_less_arrow_memory_than_iter_batches(tmp_path: Path) -> None:
    pf = _file(tmp_path, 524_288, 262_144)

    def peak(batches: object) -> int:
        """Arrow memory held while iterating, above what the process held before (other tests' tables)."""
        base = most = pa.total_allocated_bytes()
        for _ in batches:  # type: ignore[attr-defined]
            most = max(most, pa.total_allocated_bytes())
        return most - base

    ours = peak(dataset_run._batches(pf, (0, 1), None, 65_536))
    theirs = peak(pf.iter_batches(65_536, row_groups=[0, 1]))
    assert ours < theirs * 0.7, (ours, theirs)


def test_the_screen_fast_paths_agree_with_the_row_checks() -> None:
    spec = TensorSpec("X", "float32", (3,), columns=("a", "b", "c"))
    rng = np.random.default_rng(1)
    values = rng.random((1_000, 3)).astype(np.float32)
    clean = pa.table({"a": values[:, 0], "b": values[:, 1], "c": values[:, 2]})
    out = screen(clean, [spec], nan="reject")
    assert out.rejected == 0 and out.good.all() and (out.kinds, out.columns, out.messages) == ([], [], [])
    assert np.array_equal(out.inputs["X"], values)
    values[[5, 700], [1, 2]] = [np.nan, np.inf]
    dirty = pa.table({"a": values[:, 0], "b": values[:, 1], "c": values[:, 2]})
    out = screen(dirty, [spec], nan="reject")
    assert out.bad_rows.tolist() == [5, 700]
    assert out.columns == ["b", "c"] and out.kinds == ["NonFinite", "NonFinite"]
    assert np.array_equal(out.inputs["X"], np.delete(values, [5, 700], axis=0))
    assert screen(dirty, [spec]).rejected == 0  # nan = "pass": NaN is a value like any other
