"""The ``hetbatch`` command: thin argument parsing over the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from hetbatch.worker.modelops.adapt import add_parser as add_adapt_parsers
from hetbatch.worker.modelops.evaluation import add_parser as add_ensembles_parser
from hetbatch.worker.ops import dlq, reconciler
from hetbatch.worker.ops.flower import add_parser as add_flower_parser
from hetbatch.worker.ops.status import add_parser as add_status_parser

__all__ = ["main"]


def _client(args: argparse.Namespace) -> Any:
    from hetbatch.producers import Client, ClientSettings

    return Client(ClientSettings.from_env(redis_url=args.redis_url))


def cmd_worker(args: argparse.Namespace) -> int:
    from hetbatch.worker.pool import pool_env, spawn_gpu_workers
    from hetbatch.worker.settings import WorkerSettings

    gpus = [g.strip() for g in (args.gpus or "").split(",") if g.strip()]
    if gpus and args.pool != "gpu":
        raise SystemExit("hetbatch worker: --gpus needs --pool gpu")
    if len(gpus) > 1:
        passed = ["--loglevel", args.loglevel]
        options = {"--redis-url": args.redis_url, "--queues": args.queues, "--concurrency": args.concurrency}
        for flag, value in options.items():
            if value is not None:
                passed += [flag, str(value)]
        return spawn_gpu_workers(gpus, passed)
    # Before any framework is imported: CUDA reads it once, at first use; a cpu pool sees no GPU.
    os.environ.update(pool_env(args.pool, gpus[0] if gpus else None))
    print(
        f"hetbatch worker: pool={args.pool} CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}",
        file=sys.stderr,
    )
    settings = WorkerSettings.from_env(
        redis_url=args.redis_url, pool=args.pool, queues=args.queues, concurrency=args.concurrency
    )
    from hetbatch.worker.app import make_app

    app = make_app(settings)
    name = args.name or f"{settings.pool}{args.gpus or ''}-{os.getpid()}@%h"
    argv = [
        "worker",
        "-P",
        "threads",
        "-c",
        str(settings.concurrency),
        "-Q",
        ",".join(settings.queue_names),
        "-n",
        name,
        "--loglevel",
        args.loglevel,
        "--without-mingle",
        "--without-gossip",
        *(["-E"] if settings.task_events else []),
    ]
    app.worker_main(argv)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    client = _client(args)
    try:
        if args.action == "register":
            from hetbatch.worker.modelops.registration import register_path

            spec = register_path(client.registry, args.path, name=args.name, version=args.version)
            if spec.kind == "ensemble":
                print(f"registered {spec.ref} ({spec.strategy} of {', '.join(m.ref for m in spec.members)})")
            else:
                print(f"registered {spec.ref} ({spec.framework} on {spec.device}, queue {spec.queue})")
        elif args.action == "list":
            specs = client.registry.list()
            if not specs:
                print("no models registered; add one with 'hetbatch models register DIR'")
            for spec in specs:
                versions = client.registry.versions(spec.name)
                print(
                    f"{spec.name:30} {spec.kind:9} latest={spec.version:5} versions={','.join(versions)} "
                    f"{getattr(spec, 'framework', '-')}.{getattr(spec, 'device', '-')}"
                )
        elif args.action == "show":
            print(json.dumps(client.registry.get(args.path).to_dict(), indent=2, default=str))
    finally:
        client.close()
    return 0


def _batches(path: str, rows: int) -> Iterator[Any]:
    import pyarrow.parquet as pq

    # pre_buffer=False: with pre-buffering, iter_batches keeps every column chunk it has
    # read until the file is closed, so the client grew with the file (bench/etl_memory.py).
    yield from pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=rows)


def cmd_run(args: argparse.Namespace) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    keep = [c for c in (args.keep or "").split(",") if c]
    total = pq.ParquetFile(args.input).metadata.num_rows
    client = _client(args)
    writer = None
    try:
        with tqdm(total=total, unit="rows", unit_scale=True, disable=args.quiet, desc=args.model) as bar:
            for batch, result in client.map(
                args.model,
                _batches(args.input, args.batch_rows),
                max_in_flight=args.in_flight,
                timeout_s=args.timeout_s,
                cast=args.cast,
            ):
                kept = [batch.column(c) for c in keep]
                out = pa.Table.from_arrays(kept + result.columns, names=keep + result.column_names)
                if writer is None:
                    writer = pq.ParquetWriter(args.output, out.schema)
                writer.write_table(out)
                bar.update(batch.num_rows)
    finally:
        if writer is not None:
            writer.close()
        client.close()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from hetbatch.worker.devtools.demo import run_demo

    return run_demo(rows=args.rows, redis_url=args.redis_url, start_worker=not args.no_worker)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hetbatch", description="Batch inference over Redis and Celery.")
    parser.add_argument("--redis-url", default=None, help="Redis URL (default: $HETBATCH_REDIS_URL or local)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("worker", help="start a worker for a pool of queues")
    p.add_argument("--pool", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--queues", default=None, help="comma-separated queues (default: all of the pool's)")
    p.add_argument("--gpus", default=None, help="GPU indices, e.g. 0,1: one worker process each")
    p.add_argument("--concurrency", type=int, default=None, help="task threads per process")
    p.add_argument("--name", default=None, help="Celery node name")
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("models", help="register, list and show models")
    p.add_argument("action", choices=["register", "list", "show"])
    p.add_argument("path", nargs="?", help="model directory (register) or name[@version] (show)")
    p.add_argument("--name", default=None, help="register under this name instead of the config's")
    p.add_argument("--version", default=None, help="register as this version (default: next number)")
    p.set_defaults(func=cmd_models)

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

    p = sub.add_parser("demo", help="build example models, start a worker, score a Parquet file")
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--no-worker", action="store_true", help="use the workers already on this Redis (docker compose)")
    p.set_defaults(func=cmd_demo)
    add_adapt_parsers(sub)
    add_ensembles_parser(sub)
    add_flower_parser(sub)
    add_status_parser(sub)
    dlq.add_parser(sub)
    reconciler.add_parser(sub)
    for subparser in sub.choices.values():
        # Accept the option after the subcommand too, without overriding it with None.
        subparser.add_argument("--redis-url", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "models" and args.action in ("register", "show") and not args.path:
        parser.error(f"models {args.action} needs a PATH or NAME")
    from hetbatch.adapters import AdapterError
    from hetbatch.producers.errors import HetbatchError

    try:
        return int(args.func(args))
    except (HetbatchError, AdapterError) as exc:
        print(f"hetbatch: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
