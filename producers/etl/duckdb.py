"""Score a DuckDB relation or SQL query through hetbatch (extra: ``hetbatch[duckdb]``).

::

    import duckdb
    from hetbatch.producers import Client
    from hetbatch.producers.etl.duckdb import predict_duckdb

    con = duckdb.connect()
    with Client.from_url("redis://localhost:6379/0") as client:
        table = predict_duckdb(client, "churn", "SELECT * FROM 'events/*.parquet' ORDER BY id", connection=con)
        rel = predict_duckdb(client, "churn", con.sql("SELECT ..."), connection=con, output="relation")

The query's result streams through in Arrow batches (``fetch_record_batch``): memory
holds the window, not the result. Rows keep the query's order (give it an ``ORDER BY``
when the order matters: SQL promises none otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import duckdb
import pyarrow as pa

from hetbatch.producers.client import Client
from hetbatch.producers.errors import ConfigError
from hetbatch.producers.etl import predict_arrow
from hetbatch.producers.protocol.schema import CastRule

__all__ = ["predict_duckdb"]


def predict_duckdb(
    client: Client,
    model: str,
    query: duckdb.DuckDBPyRelation | str,
    *,
    connection: duckdb.DuckDBPyConnection | None = None,
    output: Literal["arrow", "relation"] = "arrow",
    keep: Sequence[str] | None = None,
    batch_rows: int = 65_536,
    max_in_flight: int = 4,
    timeout_s: float | None = 600.0,
    cast: CastRule = "safe",
) -> pa.Table | duckdb.DuckDBPyRelation:
    """The model's outputs for every row of ``query``, after the ``keep`` columns (default: all).

    Args:
        query: a relation, or SQL run on ``connection`` (default: DuckDB's default connection).
        output: ``arrow`` for a ``pyarrow.Table``, ``relation`` for a relation on ``connection``.

    Raises:
        ConfigError: a kept column is missing or has an output's name; an unknown ``output``.
        duckdb.Error: the SQL fails (DuckDB's own typed errors, e.g. ``CatalogException``).
        SchemaMismatch, JobFailed, JobTimeout: as ``Client.submit``.
    """
    if output not in ("arrow", "relation"):
        raise ConfigError(f"output={output!r}: use 'arrow' or 'relation'")
    con = connection if connection is not None else duckdb.default_connection()
    relation = con.sql(query) if isinstance(query, str) else query
    reader = relation.fetch_record_batch(batch_rows)
    table = predict_arrow(
        client, model, reader, keep=keep, batch_rows=batch_rows, max_in_flight=max_in_flight, timeout_s=timeout_s,
        cast=cast,
    )  # fmt: skip
    return table if output == "arrow" else con.from_arrow(table)
