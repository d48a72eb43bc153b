"""What one Redis carries: its CPU time and network bytes per job on each path, and the
jobs/s it served with several producer and worker processes driving it.

    python -m bench.capacity [--jobs 2000] [--large-mib 32] [--json out.json]

Redis's own counters are read before and after each run (``INFO cpu``: the server
process's user+system seconds; ``INFO stats``: bytes in and out, commands), so the
figures are Redis's cost alone, whatever the producers and workers cost. Paths: a small
job as a Celery task, on the lane, in a pack (``submit_many``), and a large job whose
payload travels through Redis or through shared memory. The saturation run starts P
producer processes and W worker processes on the lane path and reports jobs/s with the
share of one core Redis used: from it, ``jobs/s per Redis core`` = jobs/s / share (Redis
runs commands on one thread). On a small machine the producers and workers saturate
the cores before Redis does: the table says how many cores the run had.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis

from bench.run import many_producers_jobs_s, small_pieces
from bench.setup import FEATURES, build_models, start_worker, stop_process
from hetbatch.producers import Client
from hetbatch.worker.devtools.redis_server import RedisServer
from tests.kit.helpers import register

MODEL = "onnx-mlp"


def redis_counters(r: redis.Redis) -> dict[str, float]:
    cpu, stats = r.info("cpu"), r.info("stats")
    return {
        "cpu_s": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
        "in_bytes": float(stats["total_net_input_bytes"]),
        "out_bytes": float(stats["total_net_output_bytes"]),
        "commands": float(stats["total_commands_processed"]),
    }


def measured(r: redis.Redis, jobs: int, run: Callable[[], None]) -> dict[str, float]:
    """Redis's cost of ``run`` per job, and the run's wall time and Redis's share of a core."""
    before, started = redis_counters(r), time.perf_counter()
    run()
    wall_s = time.perf_counter() - started
    after = redis_counters(r)
    delta = {k: after[k] - before[k] for k in after}
    return {
        "jobs": jobs,
        "wall_s": round(wall_s, 2),
        "jobs_s": round(jobs / wall_s, 1),
        "redis_cpu_us_per_job": round(delta["cpu_s"] / jobs * 1e6, 1),
        "redis_kib_per_job": round((delta["in_bytes"] + delta["out_bytes"]) / jobs / 1024, 2),
        "commands_per_job": round(delta["commands"] / jobs, 1),
        "redis_core_share": round(delta["cpu_s"] / wall_s, 3),
        "redis_mib_s": round((delta["in_bytes"] + delta["out_bytes"]) / wall_s / 2**20, 1),
    }


def small_paths(url: str, r: redis.Redis, jobs: int) -> dict[str, dict[str, float]]:
    X = np.random.default_rng(0).standard_normal((4096, FEATURES)).astype(np.float32)
    pieces = small_pieces(X, jobs)
    out = {}
    for path, lane_rows in (("celery task", 0), ("lane", 64), ("pack (submit_many)", 0)):
        with Client.from_url(url, lane_max_rows=lane_rows) as client:
            client.predict(MODEL, pieces[0], timeout_s=120)  # loaded, lane seen alive

            def run(client: Client = client, path: str = path) -> None:
                batch = client.submit_many(MODEL, pieces) if path.startswith("pack") else None
                for job in batch or [client.submit(MODEL, p) for p in pieces]:
                    job.result(timeout_s=600)

            out[path] = measured(r, jobs, run)
            print(f"{path}: {out[path]}", flush=True)
    return out


def large_paths(url: str, r: redis.Redis, mib: int, jobs: int = 4) -> dict[str, dict[str, float]]:
    rows = mib * 2**20 // (FEATURES * 4)
    X = np.random.default_rng(1).standard_normal((rows, FEATURES)).astype(np.float32)
    out = {}
    for path, shm in (
        (f"large job ({mib} MiB) via Redis", ""),
        (f"large job ({mib} MiB) via shared memory", "/dev/shm"),
    ):
        with Client.from_url(url, shm_dir=shm) as client:
            client.predict(MODEL, X[:10], timeout_s=120)

            def run(client: Client = client) -> None:
                for job in [client.submit(MODEL, X) for _ in range(jobs)]:
                    job.result(timeout_s=600)

            out[path] = measured(r, jobs, run)
            print(f"{path}: {out[path]}", flush=True)
    return out


def saturation(url: str, r: redis.Redis, log_dir: Path, jobs_each: int, shapes: list[tuple[int, int]]) -> list[Any]:
    """jobs/s on the lane path with P producers and W workers (each P, W in ``shapes``)."""
    rows = []
    workers: list[Any] = []
    for producers, want_workers in shapes:
        while len(workers) < want_workers:
            workers.append(start_worker(url, log_dir / f"cap-worker-{len(workers)}.log", "--concurrency", "16"))
        while len(workers) > want_workers:
            stop_process(workers.pop())
        found = measured(
            r, producers * jobs_each, lambda p=producers: many_producers_jobs_s(url, MODEL, p, jobs_each, 64)
        )
        found["jobs_s"] = round(producers * jobs_each / found["wall_s"], 1)  # includes process start: lower bound
        share = max(found["redis_core_share"], 1e-9)
        row = {"producers": producers, "workers": want_workers, **found,
               "jobs_s_per_redis_core": round(found["jobs_s"] / share)}  # fmt: skip
        print(f"saturation {row}", flush=True)
        rows.append(row)
    for w in workers:
        stop_process(w)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000, help="small jobs per path")
    parser.add_argument("--large-mib", type=int, default=32, help="size of each large job")
    parser.add_argument("--saturation-jobs", type=int, default=2000, help="jobs per producer in the saturation run")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="hetbatch-capacity-"))
    server = RedisServer()
    r = redis.Redis.from_url(server.url)
    results: dict[str, Any] = {"cores": os.cpu_count(), "redis": r.info("server")["redis_version"]}
    try:
        model = build_models(root, [MODEL])[MODEL]
        with Client.from_url(server.url) as client:
            register(client, model.directory)
        worker = start_worker(server.url, root / "cap-worker.log", "--concurrency", "16")
        try:
            results["paths"] = small_paths(server.url, r, args.jobs) | large_paths(server.url, r, args.large_mib)
        finally:
            stop_process(worker)
        results["saturation"] = saturation(server.url, r, root, args.saturation_jobs, [(1, 1), (2, 1), (2, 2), (4, 2)])
    finally:
        server.stop()
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
