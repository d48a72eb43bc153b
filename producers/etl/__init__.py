"""Score data where ETL keeps it: the pieces the engine clients and dataset runs share.

Each engine has its own module, imported only when used, so ``import hetbatch`` never
pulls in Spark, Polars or DuckDB:

- ``hetbatch.producers.etl.spark``: ``predict_spark`` over ``DataFrame.mapInArrow``;
- ``hetbatch.producers.etl.polars``: ``predict_polars`` for a DataFrame or a LazyFrame;
- ``hetbatch.producers.etl.duckdb``: ``predict_duckdb`` for a relation or a SQL query.

All of them stream Arrow record batches through ``Client.submit`` with a bounded
window (``scored``), return rows in input order with the model's outputs as typed
columns after the kept columns, and raise hetbatch's typed errors
(``SchemaMismatch``, ``JobFailed``, ``ConfigError``, ...).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Generator, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa

from hetbatch.producers.client import Client, Job
from hetbatch.producers.errors import ConfigError
from hetbatch.producers.protocol.schema import CastRule

__all__ = ["attach", "check_keep", "output_schema", "predict_arrow", "probe_row", "rebatch", "score_batches", "scored"]

T = TypeVar("T")

_SCHEMAS: dict[tuple[str, str], pa.Schema] = {}


def probe_row(client: Client, model: str) -> dict[str, np.ndarray]:
    """One row of zeros shaped like the model's inputs (empty strings for string inputs)."""
    row: dict[str, np.ndarray] = {}
    for t in client.spec(model).inputs:
        if t.dtype == "string":
            row[t.name] = np.full((1, *t.shape), "", dtype=object)
        else:
            row[t.name] = np.zeros((1, *t.shape), dtype=t.dtype)
    return row


def output_schema(client: Client, model: str, *, timeout_s: float | None = 120.0) -> pa.Schema:
    """The Arrow schema of the model's outputs, in the registry entry's column order.

    The registry names the outputs but not their types, so the model scores one row of
    zeros once per ``name@version`` (cached for the process): the types are then
    exactly those of every later result, fixed-size lists included.

    Raises:
        ModelNotFound, JobFailed, JobTimeout: as ``Client.predict``.
    """
    spec = client.spec(model)
    key = (client.settings.redis_url, spec.ref)
    hit = _SCHEMAS.get(key)
    if hit is None:
        job = client.submit(spec.ref, probe_row(client, spec.ref))
        try:
            hit = _SCHEMAS[key] = job.result(timeout_s=timeout_s).schema
        finally:
            job.delete()
    return hit


def check_keep(keep: Sequence[str], available: Sequence[str], outputs: Sequence[str], where: str) -> list[str]:
    """Validate the columns to copy next to the outputs.

    Raises:
        ConfigError: a kept column is not in ``available``, or has an output's name.
    """
    missing = [c for c in keep if c not in available]
    if missing:
        raise ConfigError(
            f"--keep {','.join(missing)}: no such column in {where}; its columns are {', '.join(available[:20])}"
        )
    clash = [c for c in keep if c in outputs]
    if clash:
        raise ConfigError(f"kept column(s) {clash} have the name of a model output; rename them before scoring")
    return list(keep)


def attach(kept: pa.Table | pa.RecordBatch | None, outputs: pa.Table) -> pa.Table:
    """Kept input columns (same rows, same order) followed by the model's outputs.

    Raises:
        ConfigError: the two sides have different row counts (a bug, never silent).
    """
    if kept is None or kept.num_columns == 0:
        return outputs
    if kept.num_rows != outputs.num_rows:
        raise ConfigError(f"{kept.num_rows} kept rows against {outputs.num_rows} results; report this as a bug")
    columns = [*kept.columns, *outputs.columns]
    fields = [*kept.schema, *outputs.schema]
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def scored(
    client: Client,
    model: str,
    items: Iterable[tuple[T, Any]],
    *,
    max_in_flight: int = 4,
    timeout_s: float | None = 600.0,
    cast: CastRule = "safe",
) -> Generator[tuple[T, pa.Table | None], None, None]:
    """Score ``(tag, data)`` items with at most ``max_in_flight`` jobs out, in input order.

    An item whose ``data`` is None (nothing left to score, e.g. every row rejected) is
    passed through in its place with a None result. Each result is deleted from Redis
    once read, so Redis holds no more than the window.

    Raises:
        the errors of ``Client.submit`` and ``Job.result``, at the item they concern.
    """
    window: deque[tuple[T, Job | None]] = deque()

    def take() -> tuple[T, pa.Table | None]:
        tag, job = window.popleft()
        if job is None:
            return tag, None
        try:
            return tag, job.result(timeout_s=timeout_s)
        finally:
            job.delete()

    try:
        for tag, data in items:
            if sum(job is not None for _, job in window) >= max_in_flight:
                while window and window[0][1] is None:
                    yield take()
                yield take()
            window.append((tag, None if data is None else client.submit(model, data, cast=cast)))
        while window:
            yield take()
    finally:
        # A caller that stops early (an error, a break) leaves nothing behind in Redis.
        for _, job in window:
            if job is not None:
                job.delete()


def rebatch(batches: Iterable[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """Batches of exactly ``rows`` rows (the last one shorter), in order.

    Engines hand out batches of their own size (DuckDB 2,048-row vectors, Spark's
    ``maxRecordsPerBatch``): one job per tiny batch would pay a round trip each.
    """
    pending: list[pa.RecordBatch] = []
    held = 0
    for batch in batches:
        pending.append(batch)
        held += batch.num_rows
        if held < rows:
            continue
        table = pa.Table.from_batches(pending).combine_chunks()
        start = 0
        while held - start >= rows:
            yield table.slice(start, rows).to_batches()[0]
            start += rows
        pending = table.slice(start).to_batches() if held > start else []
        held -= start
    if held:
        yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]


def score_batches(
    client: Client,
    model: str,
    batches: Iterable[pa.RecordBatch],
    *,
    keep: Sequence[str] | None = None,
    batch_rows: int = 65_536,
    max_in_flight: int = 4,
    timeout_s: float | None = 600.0,
    cast: CastRule = "safe",
) -> Iterator[pa.Table]:
    """Score Arrow record batches in order; each output is the kept columns, then the outputs.

    Args:
        keep: input columns passed through (None: all of them; ``[]``: none).

    Raises:
        ConfigError: a kept column is missing or has an output's name.
        SchemaMismatch, JobFailed, JobTimeout: as ``Client.submit`` and ``Job.result``.
    """
    spec = client.spec(model)
    names: list[str] | None = None

    def items() -> Iterator[tuple[pa.RecordBatch | None, pa.RecordBatch]]:
        nonlocal names
        for batch in rebatch(batches, batch_rows):
            if names is None:
                available = batch.schema.names
                names = check_keep(available if keep is None else keep, available, spec.outputs, "the input")
            if batch.num_rows:
                yield (batch.select(names) if names else None), batch

    for kept, result in scored(client, model, items(), max_in_flight=max_in_flight, timeout_s=timeout_s, cast=cast):
        assert result is not None
        yield attach(kept, result)


def predict_arrow(client: Client, model: str, data: Any, **options: Any) -> pa.Table:
    """Score an Arrow table, a record batch reader or any Arrow stream (``__arrow_c_stream__``).

    The result has the input's rows, in order: the kept columns, then one typed column
    per model output. ``options`` are those of ``score_batches``.

    Raises:
        as ``score_batches``.
    """
    keep = options.get("keep")
    if isinstance(data, pa.Table):
        schema, batches = data.schema, data.to_batches()
    else:
        reader = data if isinstance(data, pa.RecordBatchReader) else pa.RecordBatchReader.from_stream(data)
        schema, batches = reader.schema, reader
    tables = list(score_batches(client, model, batches, **options))
    if tables:
        return pa.concat_tables(tables)
    names = schema.names if keep is None else list(keep)
    kept = [schema.field(n) for n in check_keep(names, schema.names, client.spec(model).outputs, "the input")]
    return pa.schema([*kept, *output_schema(client, model)]).empty_table()
