"""``hetbatch run``: score a Parquet file through the queue."""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from hetbatch.worker.cli.common import client_for

if TYPE_CHECKING:
    from hetbatch.producers.client import Client

__all__ = ["add_parsers", "score_parquet"]


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``hetbatch run``: a dataset run (resumable parts, quarantine, progress lines)."""
    from hetbatch.producers.dataset.command import add_parser

    add_parser(sub)


def _add_file_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The single-file ``run`` before dataset runs (kept for ``score_parquet``'s callers)."""
    p = sub.add_parser("run", help="score a Parquet file through the queue")
    p.add_argument("--model", required=True, help="name or name@version")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--keep", default="", help="comma-separated input columns copied to the output")
    p.add_argument("--batch-rows", type=int, default=65_536, help="rows per job")
    p.add_argument("--in-flight", type=int, default=4, help="jobs submitted ahead of the one being written")
    p.add_argument("--timeout-s", type=float, default=600.0)
    p.add_argument(
        "--cast",
        default="safe",
        choices=["safe", "same_kind", "unsafe"],
        help="how far input dtypes may be converted (default: lossless only)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)


def _batches(path: str, rows: int) -> Iterator[Any]:
    import pyarrow.parquet as pq

    # pre_buffer=False: with pre-buffering, iter_batches keeps every column chunk it has
    # read until the file is closed, so the client grew with the file (bench/etl_memory.py).
    yield from pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=rows)


def cmd_run(args: argparse.Namespace) -> int:
    client = client_for(args)
    try:
        score_parquet(
            client, args.model, args.input, args.output, keep=[c for c in (args.keep or "").split(",") if c],
            batch_rows=args.batch_rows, in_flight=args.in_flight, timeout_s=args.timeout_s, cast=args.cast,
            progress=not args.quiet,
        )  # fmt: skip
    finally:
        client.close()
    return 0


def score_parquet(
    client: Client,
    model: str,
    input_path: str,
    output_path: str,
    *,
    keep: Sequence[str] = (),
    batch_rows: int = 65_536,
    in_flight: int = 4,
    timeout_s: float = 600.0,
    cast: str = "safe",
    progress: bool = True,
) -> None:
    """What ``hetbatch run`` does (the demo times it): score ``input_path`` with ``model``
    in jobs of ``batch_rows`` rows, ``in_flight`` ahead, and write the ``keep`` columns and
    the outputs to ``output_path``.

    Raises:
        the errors of ``Client.map`` (``SchemaMismatch``, ``JobFailed``, ``JobTimeout``, ...).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    keep = list(keep)
    total = pq.ParquetFile(input_path).metadata.num_rows
    writer = None
    try:
        with tqdm(total=total, unit="rows", unit_scale=True, disable=not progress, desc=model) as bar:
            for batch, result in client.map(
                model, _batches(input_path, batch_rows), max_in_flight=in_flight, timeout_s=timeout_s, cast=cast
            ):
                kept = [batch.column(c) for c in keep]
                out = pa.Table.from_arrays(kept + result.columns, names=keep + result.column_names)
                if writer is None:
                    writer = pq.ParquetWriter(output_path, out.schema)
                writer.write_table(out)
                bar.update(batch.num_rows)
    finally:
        if writer is not None:
            writer.close()
