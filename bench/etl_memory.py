"""ETL at scale: ``hetbatch run`` over a 2,000,000-row Parquet file, client memory bounded.

Builds the demo's ONNX forest (30 float32 features), writes the Parquet file, starts a
private Redis and one CPU worker, then runs ``hetbatch run`` in a child process with
its progress bar on this terminal, and reports:

- the client's peak RSS (``wait4`` rusage of the child) next to the RSS of a process
  that only imports what ``hetbatch run`` imports: the difference is what streaming
  costs, and it must not grow with the file;
- rows/s end to end (Parquet in, Parquet out) and Redis's peak memory.

Usage: ``python -m bench.etl_memory [--rows 2000000] [--batch-rows 65536] [--in-flight 4]``
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
_IMPORTS = "import hetbatch, hetbatch.worker.cli, pyarrow.parquet, tqdm, celery"


# Linux counts the pre-exec image of a forked child in its ru_maxrss, so a child forked
# straight from this (large) process would report at least our size. A bare Python
# launcher forks the measured program instead and reports its peak from rusage.
_LAUNCHER = (
    "import resource, subprocess, sys; code = subprocess.call(sys.argv[2:]); "
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(code)"
)


def _run_measured(argv: list[str], env: dict[str, str], scratch: Path) -> tuple[int, float, int]:
    """(exit code, seconds, peak RSS in bytes) of a program; its stderr is ours."""
    report = scratch / "maxrss.txt"
    started = time.perf_counter()
    code = subprocess.call([sys.executable, "-c", _LAUNCHER, str(report), *argv], env=env, cwd=ROOT)
    seconds = time.perf_counter() - started
    return code, seconds, int(report.read_text()) * 1024  # Linux reports KiB


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--batch-rows", type=int, default=65_536)
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--workdir", default=str(ROOT / ".bench" / "etl"))
    args = parser.parse_args(argv)

    import pyarrow.parquet as pq
    import redis

    from hetbatch.producers import Client
    from hetbatch.worker.devtools.demo import _build_models, _start_worker, _write_parquet  # the demo's model and data
    from hetbatch.worker.devtools.redis_server import RedisServer
    from hetbatch.worker.modelops.registration import build_spec

    root = Path(args.workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    data = root / "input.parquet"
    print(f"building the model and a {args.rows:,}-row Parquet file in {root} ...", flush=True)
    _, features = _build_models(root)
    if not data.exists() or pq.ParquetFile(data).metadata.num_rows != args.rows:
        _write_parquet(data, features, args.rows)
    table_bytes = args.rows * (len(features) * 4 + 8)
    server = RedisServer()
    worker: Any = None
    try:
        with Client.from_url(server.url) as client:
            ref = client.registry.register(build_spec(root / "forest-onnx")).ref
        worker = _start_worker(server.url, root / "worker.log")
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        _, _, floor = _run_measured([sys.executable, "-c", _IMPORTS], env, root)
        print(f"scoring through queue onnx.cpu with {ref}; the bar below is hetbatch run's own", flush=True)
        cmd = [sys.executable, "-m", "hetbatch", "--redis-url", server.url, "run", "--model", ref,
               "--input", str(data), "--output", str(root / "output.parquet"), "--keep", "id",
               "--batch-rows", str(args.batch_rows), "--in-flight", str(args.in_flight)]  # fmt: skip
        code, seconds, peak = _run_measured(cmd, env, root)
        if code:
            print(f"hetbatch run failed with exit code {code}", file=sys.stderr)
            return code
        out_rows = pq.ParquetFile(root / "output.parquet").metadata.num_rows
        redis_peak = int(redis.Redis.from_url(server.url).info("memory")["used_memory_peak"])
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=30)
        server.stop()
    window = (args.in_flight + 1) * args.batch_rows * (len(features) * 4 + 8)
    print()
    print("hetbatch run over Parquet: client memory")
    print(f"  rows                      {args.rows:,} in, {out_rows:,} out ({len(features)} float32 features + id)")
    print(f"  input as Arrow in memory  {_mib(table_bytes)} (Parquet file {_mib(data.stat().st_size)})")
    print(f"  throughput                {args.rows / seconds:,.0f} rows/s ({seconds:.1f} s, Parquet in -> Parquet out)")
    print(f"  client peak RSS           {_mib(peak)}")
    print(f"  same imports, no work     {_mib(floor)}")
    print(f"  streaming cost            {_mib(peak - floor)} (window of {args.in_flight}+1 batches: {_mib(window)})")
    print(f"  Redis peak memory         {_mib(redis_peak)}")
    return 0 if out_rows == args.rows else 1


if __name__ == "__main__":
    sys.exit(main())
