"""The ``hetbatch`` command: thin commands that parse, then call the library.

One module per command group: ``worker``, ``models``, ``run``, ``ops`` (status, dlq,
reconcile, flower), ``adapt`` (convert, optimize, quantize, ensembles) and ``demo``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hetbatch.worker.cli import adapt, demo, models, ops, run, worker

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The parser of every ``hetbatch`` command."""
    parser = argparse.ArgumentParser(prog="hetbatch", description="Batch inference over Redis and Celery.")
    parser.add_argument("--redis-url", default=None, help="Redis URL (default: $HETBATCH_REDIS_URL or local)")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (worker, models, run, demo, adapt, ops):
        group.add_parsers(sub)
    for subparser in sub.choices.values():
        # Accept the option after the subcommand too, without overriding it with None.
        subparser.add_argument("--redis-url", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``hetbatch`` command; returns its exit status (2: a hetbatch or Redis error, printed as one line)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check = getattr(args, "check", None)
    if check is not None:
        check(parser, args)
    import redis

    from hetbatch.adapters import AdapterError
    from hetbatch.producers.errors import HetbatchError

    try:
        return int(args.func(args))
    except (HetbatchError, AdapterError) as exc:
        print(f"hetbatch: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except redis.RedisError as exc:  # a wrong password, an ACL, no Redis: one line, no traceback
        from hetbatch.producers.settings import ClientSettings
        from hetbatch.worker.connection import broker_error

        error = broker_error(exc, args.redis_url or ClientSettings.from_env().redis_url)
        print(f"hetbatch: {type(error).__name__}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
