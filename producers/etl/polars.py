"""Score a Polars DataFrame or LazyFrame through hetbatch (extra: ``hetbatch[polars]``).

::

    import polars as pl
    from hetbatch.producers import Client
    from hetbatch.producers.etl.polars import predict_polars

    with Client.from_url("redis://localhost:6379/0") as client:
        scored = predict_polars(client, "churn", pl.read_parquet("events.parquet"), keep=["user_id"])

A DataFrame comes back as a DataFrame; a LazyFrame as a LazyFrame whose plan scores
the rows when it is collected (the schema is known before, from the model's registry
entry and one probe row). Rows keep their order; outputs are typed columns (a vector
output is a Polars ``Array``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, overload

import polars as pl
import pyarrow as pa

from hetbatch.producers.client import Client
from hetbatch.producers.etl import check_keep, output_schema, predict_arrow
from hetbatch.producers.protocol.schema import CastRule

__all__ = ["predict_polars"]


def _frame(table: pa.Table) -> pl.DataFrame:
    frame = pl.from_arrow(table, rechunk=False)
    assert isinstance(frame, pl.DataFrame)
    return frame


@overload
def predict_polars(
    client: Client,
    model: str,
    frame: pl.DataFrame,
    *,
    keep: Sequence[str] | None = ...,
    batch_rows: int = ...,
    max_in_flight: int = ...,
    timeout_s: float | None = ...,
    cast: CastRule = ...,
) -> pl.DataFrame: ...
@overload
def predict_polars(
    client: Client,
    model: str,
    frame: pl.LazyFrame,
    *,
    keep: Sequence[str] | None = ...,
    batch_rows: int = ...,
    max_in_flight: int = ...,
    timeout_s: float | None = ...,
    cast: CastRule = ...,
) -> pl.LazyFrame: ...


def predict_polars(
    client: Client,
    model: str,
    frame: pl.DataFrame | pl.LazyFrame,
    *,
    keep: Sequence[str] | None = None,
    batch_rows: int = 65_536,
    max_in_flight: int = 4,
    timeout_s: float | None = 600.0,
    cast: CastRule = "safe",
) -> pl.DataFrame | pl.LazyFrame:
    """The model's outputs for every row of ``frame``, after the ``keep`` columns (default: all).

    Raises:
        ConfigError: a kept column is missing or has an output's name.
        SchemaMismatch, JobFailed, JobTimeout: as ``Client.submit`` (for a LazyFrame,
            when it is collected: Polars passes them through unchanged).
    """
    options: dict[str, Any] = {
        "keep": keep, "batch_rows": batch_rows, "max_in_flight": max_in_flight, "timeout_s": timeout_s, "cast": cast
    }  # fmt: skip
    if isinstance(frame, pl.DataFrame):
        return _frame(predict_arrow(client, model, frame.to_arrow(), **options))
    schema = frame.collect_schema()
    names = check_keep(
        list(schema.names()) if keep is None else keep, schema.names(), client.spec(model).outputs, "the frame"
    )
    outputs = _frame(output_schema(client, model).empty_table()).schema
    out_schema = pl.Schema([*((n, schema[n]) for n in names), *outputs.items()])

    def score(df: pl.DataFrame) -> pl.DataFrame:
        return _frame(predict_arrow(client, model, df.to_arrow(), **{**options, "keep": names}))

    return frame.map_batches(score, schema=out_schema)
