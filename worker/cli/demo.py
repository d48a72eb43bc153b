"""``hetbatch demo``: the whole data path on one machine (``worker.devtools.demo``)."""

from __future__ import annotations

import argparse

__all__ = ["add_parsers"]


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``hetbatch demo``."""
    p = sub.add_parser("demo", help="build example models, start a worker, score a Parquet file")
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--no-worker", action="store_true", help="use the workers already on this Redis (docker compose)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from hetbatch.worker.devtools.demo import run_demo

    return run_demo(rows=args.rows, redis_url=args.redis_url, start_worker=not args.no_worker)
