"""ETL engine clients against the real engines (Polars, DuckDB, Spark in local mode), a
real Redis and a real worker: answers equal the model in-process, rows in input order."""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hetbatch.producers import Client, ConfigError, SchemaMismatch
from tests.kit.helpers import ROOT, WorkerProcess, column, register
from tests.kit.models import Built, onnx_mlp

FEATURES = [f"f{i}" for i in range(8)]


@pytest.fixture(scope="module")
def mlp(work_dir: Path) -> Built:
    inputs = [{"name": "x", "dtype": "float32", "shape": [8], "columns": FEATURES}]
    return onnx_mlp(work_dir / "etl-mlp", "etl-mlp", features=8, hidden=32, classes=4, inputs=inputs)


def frame_data(rows: int, seed: int = 0) -> pa.Table:
    X = np.random.default_rng(seed).standard_normal((rows, len(FEATURES))).astype(np.float32)
    return pa.table({"id": np.arange(rows), "tag": [f"r{i}" for i in range(rows)], **dict(zip(FEATURES, X.T))})


def in_process(built: Built, table: pa.Table) -> np.ndarray:
    X = np.stack([table.column(f).to_numpy() for f in FEATURES], axis=1)
    return np.asarray(built.model.run(None, {"x": X})[0])


def test_polars_dataframe_and_lazyframe_equal_in_process_in_order(
    client: Client, cpu_worker: WorkerProcess, mlp: Built
) -> None:
    pl = pytest.importorskip("polars")
    from hetbatch.producers.etl.polars import predict_polars

    register(client, mlp.directory)
    table = frame_data(5_000)
    expected = in_process(mlp, table)
    df = pl.from_arrow(table)
    out = predict_polars(client, "etl-mlp", df, keep=["id", "tag"], batch_rows=1_500)
    assert isinstance(out, pl.DataFrame) and out.columns == ["id", "tag", "probabilities"]
    assert out["probabilities"].dtype == pl.Array(pl.Float32, 4)
    np.testing.assert_array_equal(out["id"].to_numpy(), np.arange(5_000))
    np.testing.assert_allclose(out["probabilities"].to_numpy(), expected, atol=1e-6)

    lazy = df.lazy().filter(pl.col("id") % 2 == 0)
    scored = predict_polars(client, "etl-mlp", lazy, batch_rows=1_000)
    assert isinstance(scored, pl.LazyFrame)
    assert scored.collect_schema().names() == [*table.column_names, "probabilities"]
    got = scored.collect()
    np.testing.assert_array_equal(got["id"].to_numpy(), np.arange(0, 5_000, 2))
    np.testing.assert_allclose(got["probabilities"].to_numpy(), expected[::2], atol=1e-6)

    with pytest.raises(ConfigError, match="--keep nope"):
        predict_polars(client, "etl-mlp", df, keep=["nope"])
    with pytest.raises(SchemaMismatch, match="f3"):
        predict_polars(client, "etl-mlp", df.with_columns(pl.col("f3").cast(pl.Utf8)))


def test_duckdb_sql_and_relation_equal_in_process_in_order(
    client: Client, cpu_worker: WorkerProcess, mlp: Built, tmp_path: Path
) -> None:
    duckdb = pytest.importorskip("duckdb")
    from hetbatch.producers.etl.duckdb import predict_duckdb

    register(client, mlp.directory)
    table = frame_data(7_000, seed=1)
    pq.write_table(table, tmp_path / "events.parquet", row_group_size=2_000)
    expected = in_process(mlp, table)
    con = duckdb.connect()
    sql = f"SELECT id, {', '.join(FEATURES)} FROM '{tmp_path / 'events.parquet'}' ORDER BY id DESC"
    out = predict_duckdb(client, "etl-mlp", sql, connection=con, keep=["id"], batch_rows=1_024)
    assert isinstance(out, pa.Table) and out.column_names == ["id", "probabilities"]
    np.testing.assert_array_equal(out.column("id").to_numpy(), np.arange(7_000)[::-1])
    np.testing.assert_allclose(column(out, "probabilities"), expected[::-1], atol=1e-6)

    rel = con.sql(f"SELECT * FROM '{tmp_path / 'events.parquet'}' WHERE id < 3000 ORDER BY id")
    scored = predict_duckdb(client, "etl-mlp", rel, connection=con, output="relation")
    assert isinstance(scored, duckdb.DuckDBPyRelation)
    top = con.sql("SELECT id, probabilities FROM scored ORDER BY id").fetch_arrow_table()
    np.testing.assert_allclose(column(top, "probabilities"), expected[:3000], atol=1e-6)

    with pytest.raises(duckdb.CatalogException):
        predict_duckdb(client, "etl-mlp", "SELECT * FROM no_such_table", connection=con)


# -- Spark -------------------------------------------------------------------------------

_SESSIONS: dict[str, Any] = {}


def onnx_in_spark(path: str) -> Any:
    """``mapInArrow`` scoring with onnxruntime inside the Spark worker: the baseline."""

    def score(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import onnxruntime as ort

        session = _SESSIONS.get(path)
        if session is None:
            session = _SESSIONS[path] = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        for batch in batches:
            X = np.stack([batch.column(f).to_numpy() for f in FEATURES], axis=1)
            proba = session.run(None, {"x": X})[0]
            flat = pa.array(proba.reshape(-1))
            lists = pa.ListArray.from_arrays(
                pa.array(np.arange(0, len(flat) + 1, proba.shape[1], dtype=np.int32)), flat
            )
            yield pa.RecordBatch.from_arrays([batch.column("id"), lists], names=["id", "probabilities"])

    return score


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    pytest.importorskip("pyspark")
    if shutil.which("java") is None:
        pytest.skip("no JVM: apt-get install -y openjdk-17-jre-headless")
    from pyspark.sql import SparkSession

    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    session = (
        SparkSession.builder.master("local[2]")
        .appName("hetbatch-test")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.memory", "1g")
        .config("spark.sql.files.openCostInBytes", str(256 * 2**20))  # one partition per file
        .config("spark.sql.shuffle.partitions", "8")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.mark.slow
def test_spark_million_rows_in_eight_partitions_equal_in_process(
    client: Client, cpu_worker: WorkerProcess, mlp: Built, spark: Any, tmp_path: Path
) -> None:
    from hetbatch.producers.etl.spark import predict_spark

    register(client, mlp.directory)
    rows, files = 1_000_000, 8
    data = tmp_path / "events"
    data.mkdir()
    table = frame_data(rows, seed=2).drop(["tag"])
    for k in range(files):
        pq.write_table(table.slice(k * rows // files, rows // files), data / f"part-{k}.parquet")
    expected = in_process(mlp, table)
    df = spark.read.parquet(str(data))
    assert df.rdd.getNumPartitions() == files

    started = time.perf_counter()
    out = predict_spark(df, "etl-mlp", redis_url=client.settings.redis_url, keep=["id"], batch_rows=32_768)
    got = out.toArrow().sort_by("id")
    hetbatch_s = time.perf_counter() - started
    assert out.columns == ["id", "probabilities"] and got.num_rows == rows
    np.testing.assert_array_equal(got.column("id").to_numpy(), np.arange(rows))
    proba = np.stack(got.column("probabilities").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(proba, expected, atol=1e-6)

    started = time.perf_counter()
    schema = "id long, probabilities array<float>"
    base = df.mapInArrow(onnx_in_spark(str(mlp.directory / "model.onnx")), schema).toArrow().sort_by("id")
    inside_s = time.perf_counter() - started
    np.testing.assert_allclose(
        np.stack(base.column("probabilities").to_numpy(zero_copy_only=False)), expected, atol=1e-6
    )
    print(
        f"\nspark local[2], {rows:,} rows in {files} partitions: through hetbatch {rows / hetbatch_s:,.0f} rows/s, "
        f"ONNX inside mapInArrow {rows / inside_s:,.0f} rows/s (ratio {inside_s / hetbatch_s:.2f})"
    )
