"""``hetbatch worker``: start a worker process (or one per GPU)."""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["add_parsers"]


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``hetbatch worker``."""
    p = sub.add_parser("worker", help="start a worker for a pool of queues")
    p.add_argument("--pool", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--queues", default=None, help="comma-separated queues (default: all of the pool's)")
    p.add_argument("--gpus", default=None, help="GPU indices, e.g. 0,1: one worker process each")
    p.add_argument("--concurrency", type=int, default=None, help="task threads per process")
    p.add_argument("--name", default=None, help="Celery node name")
    p.add_argument("--loglevel", default="INFO")
    p.add_argument(
        "--preload", default=None, metavar="MODELS",
        help="comma-separated name or name@version: loaded and warmed up before any job is taken",
    )  # fmt: skip
    p.add_argument(
        "--wait-for-redis", action="store_true", default=None,
        help="retry a refused Redis login until it succeeds (default: exit after a few tries)",
    )  # fmt: skip
    p.set_defaults(func=cmd_worker)


def cmd_worker(args: argparse.Namespace) -> int:
    from hetbatch.worker.pool import NoGpu, gpu_frameworks, pool_env, spawn_gpu_workers, visible_gpus

    gpus = [g.strip() for g in (args.gpus or "").split(",") if g.strip()]
    if gpus and args.pool != "gpu":
        raise SystemExit("hetbatch worker: --gpus needs --pool gpu")
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    # HETBATCH_GPU_CHECK=0 starts a gpu pool without its device check (tests of the
    # pool's plumbing on a machine without a GPU); its gpu models then fail to load.
    if args.pool == "gpu" and os.environ.get("HETBATCH_GPU_CHECK", "1") == "0":
        gpus = gpus or ["0"]
    elif args.pool == "gpu":
        # Fail fast, before consuming anything: a gpu worker without a GPU would fail every job.
        try:
            visible = visible_gpus()
            gpus = gpus or [str(i) for i in range(len(visible))]  # no --gpus: every visible GPU
            pool_env("gpu", gpus[0], inherited)  # an index past the visible ones fails here
        except NoGpu as exc:
            raise SystemExit(f"hetbatch worker: --pool gpu: {exc}") from None
        # Importing a framework does not touch the driver: CUDA_VISIBLE_DEVICES set below still counts.
        if not args.queues and not gpu_frameworks():
            raise SystemExit("hetbatch worker: --pool gpu: none of onnxruntime, torch, tensorflow imports here")
    if len(gpus) > 1:
        passed = ["--loglevel", args.loglevel, *(["--wait-for-redis"] if args.wait_for_redis else [])]
        options = {
            "--redis-url": args.redis_url, "--queues": args.queues,
            "--concurrency": args.concurrency, "--preload": args.preload,
        }  # fmt: skip
        for flag, value in options.items():
            if value is not None:
                passed += [flag, str(value)]
        return spawn_gpu_workers(gpus, passed)
    # Before any framework is imported: CUDA reads it once, at first use; a cpu pool sees no GPU.
    os.environ.update(pool_env(args.pool, gpus[0] if gpus else None, inherited))
    print(
        f"hetbatch worker: pool={args.pool} CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}",
        file=sys.stderr,
    )
    from hetbatch.worker.process import WorkerProcess
    from hetbatch.worker.settings import WorkerSettings

    settings = WorkerSettings.from_env(
        redis_url=args.redis_url,
        pool=args.pool,
        queues=args.queues,
        concurrency=args.concurrency,
        wait_for_redis=args.wait_for_redis,
        preload=args.preload,
    )
    name = args.name or f"{settings.pool}{args.gpus or ''}-{os.getpid()}@%h"
    WorkerProcess(settings).run(name, loglevel=args.loglevel)
    return 0
