"""Score a Spark DataFrame through hetbatch with ``mapInArrow`` (extra: ``hetbatch[spark]``).

::

    from pyspark.sql import SparkSession
    from hetbatch.producers.etl.spark import predict_spark

    spark = SparkSession.builder.getOrCreate()
    df = spark.read.parquet("s3a://lake/events/")
    scored = predict_spark(df, "churn", redis_url="redis://queue:6379/0", keep=["user_id"])
    scored.write.parquet("s3a://lake/scores/")

Each partition streams its Arrow batches through a ``Client`` kept once per Python
worker process (Spark reuses them between tasks), with at most ``max_in_flight`` jobs
out; the model itself runs on the hetbatch pools its registry entry names, CPU or GPU,
not in the Spark executor. The output schema is known on the driver before any task
runs: the kept columns' Spark types, then the model's outputs (names from the registry
entry, types from one probe row); a vector output becomes ``array<float>``. Spark ships
the mapped function to its workers with its own serializer (cloudpickle); the function
holds only the model's ``name@version``, the column names and the settings, and no
hetbatch payload is ever pickled.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql.pandas.types import from_arrow_type
from pyspark.sql.types import StructField, StructType

from hetbatch.producers.client import Client
from hetbatch.producers.etl import check_keep, output_schema, score_batches
from hetbatch.producers.protocol.schema import CastRule
from hetbatch.producers.settings import ClientSettings

__all__ = ["predict_spark", "spark_compatible"]

_CLIENTS: dict[tuple[str | None, tuple[tuple[str, Any], ...]], Client] = {}
_LOCK = threading.Lock()


def _worker_client(redis_url: str | None, settings: Mapping[str, Any]) -> Client:
    """The client of this Python worker process: one Redis pool and one reply listener for every task."""
    key = (redis_url, tuple(sorted(settings.items())))
    with _LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            client = _CLIENTS[key] = Client(ClientSettings.from_env(redis_url=redis_url, **settings))
            atexit.register(client.close)
        return client


def _plain(t: pa.DataType) -> pa.DataType:
    """Arrow types Spark reads: fixed-size lists and tensors as variable lists."""
    if isinstance(t, pa.FixedShapeTensorType):
        return pa.list_(_plain(t.value_type))
    if pa.types.is_fixed_size_list(t):
        return pa.list_(_plain(t.value_type))
    return t


def spark_compatible(table: pa.Table) -> pa.Table:
    """``table`` with the column types Spark's Arrow reader takes (see ``_plain``)."""
    columns, fields = [], []
    for f, col in zip(table.schema, table.columns):
        t = _plain(f.type)
        if t != f.type:
            if isinstance(f.type, pa.FixedShapeTensorType):
                col = pa.chunked_array([c.storage for c in col.chunks], type=f.type.storage_type)
            col = col.cast(t)
        columns.append(col)
        fields.append(pa.field(f.name, t))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def predict_spark(
    df: DataFrame,
    model: str,
    *,
    redis_url: str | None = None,
    keep: Sequence[str] | None = None,
    batch_rows: int = 65_536,
    max_in_flight: int = 4,
    timeout_s: float | None = 600.0,
    cast: CastRule = "safe",
    settings: Mapping[str, Any] | None = None,
) -> DataFrame:
    """A lazy DataFrame: the ``keep`` columns of ``df`` (default: all), then the model's outputs.

    The model is resolved once, on the driver, to ``name@version``: every partition
    scores with the same version even if a new one is registered during the job.

    Args:
        redis_url: the queue's Redis, as the executors reach it (default: ``$HETBATCH_REDIS_URL``
            on each executor).
        settings: other ``ClientSettings`` fields for the executors' clients.

    Raises:
        ConfigError: a kept column is missing or has an output's name.
        ModelNotFound: on the driver, at once. SchemaMismatch, JobFailed, JobTimeout:
            in the task that meets them, failing the Spark job with their message.
    """
    extra = dict(settings or {})
    with Client(ClientSettings.from_env(redis_url=redis_url, **extra)) as client:
        spec = client.registry.get(model)
        outputs = spark_compatible(output_schema(client, spec.ref).empty_table()).schema
    names = check_keep(df.columns if keep is None else keep, df.columns, spec.outputs, "the DataFrame")
    by_name = {f.name: f for f in df.schema.fields}
    schema = StructType(
        [by_name[n] for n in names] + [StructField(f.name, from_arrow_type(f.type), nullable=True) for f in outputs]
    )
    ref = spec.ref

    def score(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        client = _worker_client(redis_url, extra)
        for table in score_batches(
            client, ref, batches, keep=names, batch_rows=batch_rows, max_in_flight=max_in_flight, timeout_s=timeout_s,
            cast=cast,
        ):  # fmt: skip
            yield from spark_compatible(table).to_batches()

    return df.mapInArrow(score, schema)
