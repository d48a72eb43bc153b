"""``hetbatch run``: score a Parquet file or dataset through the queue (``run_dataset``)."""

from __future__ import annotations

import argparse
from typing import Any

from hetbatch.producers.dataset.progress import ProgressMode
from hetbatch.producers.dataset.run import RunOptions, run_dataset

__all__ = ["add_parsers", "cmd_run", "options_from_args"]


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``hetbatch run``: a dataset run (resumable parts, quarantine, progress lines)."""
    add_parser(sub)


def options_from_args(args: argparse.Namespace) -> RunOptions:
    """The run's settings from parsed ``hetbatch run`` flags."""
    storage = dict(item.split("=", 1) for item in args.storage_option or [])
    progress: ProgressMode = "json" if args.json else "quiet" if args.quiet else "bar"
    return RunOptions(
        model=args.model,
        inputs=tuple(args.input),
        output=args.output,
        keep=tuple(c for c in (args.keep or "").split(",") if c),
        batch_rows=args.batch_rows,
        part_rows=args.part_rows,
        in_flight=args.in_flight,
        timeout_s=args.timeout_s,
        cast=args.cast,
        on_error=args.on_error,
        rejects=args.rejects,
        restart=args.restart,
        progress=progress,
        storage=storage,
    )


def cmd_run(args: argparse.Namespace) -> int:
    """Run ``hetbatch run``; 0 when every part is committed.

    Raises:
        the errors of ``run_dataset`` (the CLI prints them on one line).
    """
    from hetbatch.producers import Client, ClientSettings

    with Client(ClientSettings.from_env(redis_url=args.redis_url)) as client:
        run_dataset(options_from_args(args), client)
    return 0


def add_parser(sub: Any) -> None:
    """Add ``run`` to the ``hetbatch`` subcommands."""
    p = sub.add_parser(
        "run",
        help="score a Parquet file or dataset through the queue (resumable)",
        description="Score a file, a folder (hive partitions too), globs or a list of Parquet files, local or "
        "s3://. Output parts mirror the input's files and are committed atomically; the same command again "
        "resumes an interrupted run from its manifest.",
    )
    p.add_argument("--model", required=True, help="name or name@version")
    p.add_argument("--input", required=True, nargs="+", help="file, folder, glob or several files")
    p.add_argument("--output", required=True, help="folder (or a .parquet file when the input is one file)")
    p.add_argument("--keep", default="", help="comma-separated input columns copied to the output")
    p.add_argument("--batch-rows", type=int, default=65_536, help="rows per job")
    p.add_argument("--part-rows", type=int, default=1_048_576, help="rows per output part of a large file")
    p.add_argument("--in-flight", type=int, default=4, help="jobs submitted ahead of the one being written")
    p.add_argument("--timeout-s", type=float, default=600.0, help="seconds to wait for one job")
    p.add_argument(
        "--cast",
        default="safe",
        choices=["safe", "same_kind", "unsafe"],
        help="how far input dtypes may be converted (default: lossless only)",
    )
    p.add_argument(
        "--on-error",
        default="fail",
        choices=["fail", "quarantine"],
        help="stop at the first bad row (naming file, row, column) or set bad rows aside in --rejects",
    )
    p.add_argument("--rejects", default=None, help="folder for rejected rows, with their error type and message")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run (the default when one is found)")
    p.add_argument("--restart", action="store_true", help="ignore an earlier run's manifest and score everything")
    p.add_argument(
        "--storage-option",
        action="append",
        metavar="KEY=VALUE",
        help="filesystem option: endpoint_url, access_key, secret_key, region (default: AWS_* variables)",
    )
    p.add_argument("--json", action="store_true", help="progress and summary as JSON lines on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)
