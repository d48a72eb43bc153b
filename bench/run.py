"""``make bench`` / ``make bench-quick``: hetbatch against the in-process model call.

Every figure comes from one run on this machine: a private redis-server, real worker
processes, the same models and rows on both sides. Medians of repeats; ratios are
hetbatch / in-process (or / naive). Writes ``.bench/results.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import numpy as np

from bench import ray_data
from bench.setup import FEATURES, ROOT, BenchModel, build_models, start_process, start_worker, stop_process
from hetbatch.producers import Client
from hetbatch.worker.devtools.redis_server import RedisServer


def inproc_rows_s(model: BenchModel, X: np.ndarray, batch: int) -> float:
    """One pass of the model over ``X`` in-process, ``batch`` rows per call."""
    started = time.perf_counter()
    for start in range(0, len(X), batch):
        model.call({model.input_name: X[start : start + batch]})
    return len(X) / (time.perf_counter() - started)


def inprocess_rows_s(model: BenchModel, X: np.ndarray, batch: int, repeats: int) -> float:
    inproc_rows_s(model, X, batch)  # warm
    return statistics.median(inproc_rows_s(model, X, batch) for _ in range(repeats))


def large_job_rows_s(client: Client, name: str, X: np.ndarray) -> float:
    """One job of every row of ``X`` end to end: submit, then the whole result as a table."""
    started = time.perf_counter()
    client.predict(name, X, timeout_s=600)
    return len(X) / (time.perf_counter() - started)


LANE_ROWS = 16  # the small jobs' largest size: every one of them takes the lane


def small_pieces(X: np.ndarray, jobs: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 17, jobs)
    starts = rng.integers(0, len(X) - 16, jobs)
    return [X[s : s + n] for s, n in zip(starts, sizes)]


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_calls(client: Client) -> int:
    return sum(int(v["calls"]) for v in cast(dict[str, Any], client.redis.info("commandstats")).values())


def small_job_costs(client: Client, name: str, pieces: list[np.ndarray], pids: list[int]) -> tuple[float, float, float]:
    """(jobs/s, CPU microseconds per job over producer + worker + Redis, Redis commands per
    job) of ``submit_many`` and reading every result."""
    started_cpu = time.process_time() + sum(cpu_s(p) for p in pids)
    started_calls = redis_calls(client)
    rate = small_jobs_s(client, name, pieces, coalesce=True)
    calls = redis_calls(client) - started_calls - 1  # this INFO itself
    cpu = time.process_time() + sum(cpu_s(p) for p in pids) - started_cpu
    return rate, cpu / len(pieces) * 1e6, calls / len(pieces)


def small_jobs_s(client: Client, name: str, pieces: list[np.ndarray], coalesce: bool) -> float:
    started = time.perf_counter()
    if coalesce:
        jobs = client.submit_many(name, pieces)
    else:
        jobs = [client.submit(name, p) for p in pieces]
    for job in jobs:
        job.result(timeout_s=600)
    return len(pieces) / (time.perf_counter() - started)


def _producer_process(url: str, name: str, jobs: int, seed: int, out: Any, lane_max_rows: int) -> None:
    X = np.random.default_rng(seed).standard_normal((4096, FEATURES)).astype(np.float32)
    with Client.from_url(url, lane_max_rows=lane_max_rows) as client:
        pieces = small_pieces(X, jobs, seed)
        client.predict(name, pieces[0], timeout_s=60)
        out.put(small_jobs_s(client, name, pieces, coalesce=False))


def many_producers_jobs_s(url: str, name: str, producers: int, jobs_each: int, lane_max_rows: int = 0) -> float:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_producer_process, args=(url, name, jobs_each, i, queue, lane_max_rows))
        for i in range(producers)
    ]
    for p in procs:
        p.start()
    rates = [queue.get(timeout=900) for _ in procs]
    for p in procs:
        p.join()
    return float(sum(rates))


def latency_ms(client: Client, name: str, X: np.ndarray, jobs: int, rate_per_s: float) -> tuple[float, float]:
    t0 = time.perf_counter() + 0.05
    lat: list[float] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        delay = t0 + i / rate_per_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        started = time.perf_counter()
        client.submit(name, X[i % len(X) : i % len(X) + 1]).result(timeout_s=60)
        with lock:
            lat.append((time.perf_counter() - started) * 1000)

    with ThreadPoolExecutor(max_workers=32) as pool:
        list(pool.map(one, range(jobs)))
    return float(np.percentile(lat, 50)), float(np.percentile(lat, 99))


def naive_rows_s(url: str, model: Path, X: np.ndarray, rows: int, log_dir: Path) -> tuple[float, float]:
    """(rows/s of one Celery task per JSON row, no-op Celery task round trips/s)."""
    env = {"NAIVE_BROKER": url, "NAIVE_MODEL": str(model)}
    proc = start_process([sys.executable, "-m", "bench.naive"], log_dir / "naive.log", env)
    try:
        import os

        os.environ.update(env)
        from bench.naive import noop, predict

        predict.delay([0.0] * FEATURES).get(timeout=60)
        started = time.perf_counter()
        handles = [predict.delay(X[i].tolist()) for i in range(rows)]
        for h in handles:
            h.get(timeout=600)
        naive = rows / (time.perf_counter() - started)
        started = time.perf_counter()
        handles = [noop.delay() for _ in range(rows)]
        for h in handles:
            h.get(timeout=600)
        return naive, rows / (time.perf_counter() - started)
    finally:
        stop_process(proc)


def batch_stats(client: Client, ref: str) -> dict[str, float]:
    raw = client.redis.hgetall(client.keys.batch_stats(ref))
    return {k.decode(): float(v) for k, v in raw.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rows and jobs: under 3 minutes")
    parser.add_argument("--models", default="onnx-mlp,forest,forest-onnx,torch-mlp")
    parser.add_argument("--out", default=str(ROOT / ".bench" / "results.json"))
    parser.add_argument("--no-ensemble", action="store_true", help="skip the ensemble row")
    args = parser.parse_args(argv)
    q = args.quick
    rows, jobs, naive_n, lat_jobs, repeats = (
        (200_000, 4_000, 1_000, 200, 3) if q else (1_000_000, 20_000, 3_000, 1000, 5)
    )
    work = Path(args.out).parent
    work.mkdir(parents=True, exist_ok=True)
    X = np.random.default_rng(1).standard_normal((rows, FEATURES)).astype(np.float32)
    results: dict[str, Any] = {"machine": _machine(), "rows": rows, "small_jobs": jobs, "models": {}}
    with RedisServer() as server:
        models = build_models(work / "models", args.models.split(","))
        # This process now holds torch, scikit-learn and ONNX objects for good: a full
        # collection walking them (~400k) stalled the measured client for 240 ms.
        gc.collect()
        gc.freeze()
        worker = start_worker(server.url, work / "worker.log")
        client = Client.from_url(server.url)
        remote = Client.from_url(server.url, shm_dir="")
        try:
            from hetbatch.worker.modelops.registration import build_spec

            refs = {n: client.registry.register(build_spec(m.directory)).ref for n, m in models.items()}
            for name, model in models.items():
                print(f"[bench] {name}: in-process and one large job of {rows:,} rows...", flush=True)
                fig: dict[str, Any] = {}
                client.redis.delete(client.keys.batch_stats(refs[name]))
                # Interleaved, one repeat of each at a time: the machine's load drifts, and
                # a ratio should compare runs made under the same conditions.
                client.predict(name, X[:256], timeout_s=120)  # load the model on the worker
                inproc_rows_s(model, X, 4096)  # warm
                runs = [
                    (
                        inproc_rows_s(model, X, 4096),
                        inproc_rows_s(model, X, 8192),
                        large_job_rows_s(client, name, X),  # shared memory: this host's worker
                        large_job_rows_s(remote, name, X),  # through Redis, as from another host
                    )
                    for _ in range(repeats)
                ]
                names = ("inproc_4096_rows_s", "inproc_8192_rows_s", "e2e_large_rows_s", "e2e_large_redis_rows_s")
                for key, values in zip(names, zip(*runs)):
                    fig[key] = statistics.median(values)
                best = max(fig["inproc_4096_rows_s"], fig["inproc_8192_rows_s"])
                fig["large_ratio"] = fig["e2e_large_rows_s"] / best
                fig["large_redis_ratio"] = fig["e2e_large_redis_rows_s"] / best
                results["models"][name] = fig
            mlp = "onnx-mlp"
            if mlp in models and not q and ray_data.available():
                print(f"[bench] {mlp}: Ray Data map_batches on the same rows...", flush=True)
                m = models[mlp]
                fig = results["models"][mlp]
                fig["ray_data_rows_s"], inproc = ray_data.ray_vs_inprocess(
                    m.directory / "model.onnx",
                    X,
                    lambda: max(inproc_rows_s(m, X, 4096), inproc_rows_s(m, X, 8192)),
                    repeats,
                )
                fig["ray_data_ratio"] = fig["ray_data_rows_s"] / inproc
            if mlp in models:
                fig = results["models"][mlp]
                pieces = small_pieces(X, jobs)
                print(f"[bench] {mlp}: {jobs:,} small jobs, one producer...", flush=True)
                client.redis.delete(client.keys.batch_stats(refs[mlp]))
                fig["small_coalesced_jobs_s"], fig["small_cpu_us_per_job"], fig["small_redis_commands_per_job"] = (
                    small_job_costs(client, mlp, pieces, [worker.pid, server.proc.pid])
                )
                time.sleep(0.5)  # the worker writes batch stats off the model's path
                stats = batch_stats(client, refs[mlp])
                fig["small_avg_batch_rows"] = stats["rows"] / stats["batches"]
                # The model inside the worker, with the producer idle: the worker drains a
                # backlog of the same small jobs, and its model calls are timed.
                print(f"[bench] {mlp}: a worker draining a backlog of {jobs:,} small jobs...", flush=True)
                stop_process(worker)
                client.redis.delete(client.keys.batch_stats(refs[mlp]))
                ledger = client.keys.ledger()
                before = int(client.redis.zcard(ledger))
                backlog = client.submit_many(mlp, pieces)
                worker = start_worker(server.url, work / "worker.log")
                started = time.perf_counter()
                # Done when every pack's task has left the ledger (its result is stored);
                # the 20,000 results are read after the clock stops, so this client's
                # decoding does not share the cores with the worker meanwhile.
                while int(client.redis.zcard(ledger)) > before:
                    time.sleep(0.01)
                fig["drain_jobs_s"] = jobs / (time.perf_counter() - started)
                for job in backlog:
                    job.result(timeout_s=600)
                time.sleep(0.5)
                stats = batch_stats(client, refs[mlp])
                fig["drain_avg_batch_rows"] = stats["rows"] / stats["batches"]
                # Rows over the time some model call ran (instances overlap: not compute_s).
                fig["worker_model_rows_s"] = stats["rows"] / stats["busy_s"]
                avg = max(1, int(fig["drain_avg_batch_rows"]))
                fig["inproc_at_formed_batch_rows_s"] = inprocess_rows_s(models[mlp], X, avg, repeats)
                fig["worker_model_efficiency"] = fig["worker_model_rows_s"] / fig["inproc_at_formed_batch_rows_s"]
                fig["small_single_jobs_s"] = small_jobs_s(client, mlp, pieces[: jobs // 4], coalesce=False)
                print(f"[bench] naive peer and Celery no-op rate ({naive_n:,} tasks each)...", flush=True)
                naive, noop = naive_rows_s(server.url, models[mlp].directory / "model.onnx", X, naive_n, work)
                fig["naive_jobs_s"] = naive
                fig["celery_noop_tasks_s"] = noop
                fig["coalesced_vs_naive"] = fig["small_coalesced_jobs_s"] / naive
                fig["single_vs_naive"] = fig["small_single_jobs_s"] / naive
                print("[bench] many independent producers...", flush=True)
                fig["many_producers_jobs_s"] = many_producers_jobs_s(server.url, mlp, 4, jobs // 8)
                fig["many_producers_vs_noop"] = fig["many_producers_jobs_s"] / noop
                # The same jobs on the lane (lane_max_rows): bare envelopes drained in batches.
                fig["many_producers_lane_jobs_s"] = many_producers_jobs_s(server.url, mlp, 4, jobs // 8, LANE_ROWS)
                fig["many_producers_lane_vs_noop"] = fig["many_producers_lane_jobs_s"] / noop
                with Client.from_url(server.url, lane_max_rows=LANE_ROWS) as lane_client:
                    fig["small_lane_jobs_s"] = small_jobs_s(lane_client, mlp, pieces[: jobs // 4], coalesce=False)
                    fig["lane_vs_naive"] = fig["small_lane_jobs_s"] / naive
                    print(f"[bench] latency of 1-row jobs at 100 jobs/s ({lat_jobs} jobs)...", flush=True)
                    fig["latency_p50_ms"], fig["latency_p99_ms"] = latency_ms(client, mlp, X, lat_jobs, 100.0)
                    fig["latency_lane_p50_ms"], fig["latency_lane_p99_ms"] = latency_ms(
                        lane_client, mlp, X, lat_jobs, 100.0
                    )
        finally:
            client.close()
            remote.close()
            stop_process(worker)
    if not args.no_ensemble:
        from bench.ensemble import run as run_ensemble

        print("[bench] a 3-member soft-vote ensemble end to end...", flush=True)
        results["ensemble"] = run_ensemble(
            rows=rows // 10 if q else rows // 5, repeats=1 if q else 3, workdir=str(work / "ensemble")
        )
    Path(args.out).write_text(json.dumps(results, indent=2))
    print_table(results)
    print(f"\nall figures: {args.out}")
    return 0


def _machine() -> dict[str, Any]:
    import os
    import platform

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def print_table(results: dict[str, Any]) -> None:
    print(f"\nhetbatch benchmark: {results['rows']:,} rows, {results['machine']['cpus']} CPUs (medians)")
    print("(hetbatch: input through shared memory, as from a producer on the worker's host;")
    print(" via Redis: the same job from a producer without the folder, as from another host)")
    print(f"{'model':14} {'in-process rows/s':>18} {'hetbatch rows/s':>16} {'ratio':>6} {'via Redis':>10} {'ratio':>6}")
    for name, fig in results["models"].items():
        best = max(fig["inproc_4096_rows_s"], fig["inproc_8192_rows_s"])
        print(
            f"{name:14} {best:18,.0f} {fig['e2e_large_rows_s']:16,.0f} {fig['large_ratio']:6.2f}"
            f" {fig['e2e_large_redis_rows_s']:10,.0f} {fig['large_redis_ratio']:6.2f}"
        )
    fig = results["models"].get("onnx-mlp", {})
    if "ray_data_rows_s" in fig:
        print(
            f"Ray Data map_batches, onnx-mlp (2 actors of one thread, 4,096-row batches, one job): "
            f"{fig['ray_data_rows_s']:,.0f} rows/s = {fig['ray_data_ratio']:.2f}x in-process"
        )
    if "small_coalesced_jobs_s" in fig:
        print("\nsmall jobs (1-16 rows, onnx-mlp), jobs/s:")
        print(f"  naive one Celery task per row   {fig['naive_jobs_s']:10,.0f}   1.0x")
        print(f"  hetbatch, one submit per job    {fig['small_single_jobs_s']:10,.0f}  {fig['single_vs_naive']:5.1f}x")
        print(f"    the same on the lane          {fig['small_lane_jobs_s']:10,.0f}  {fig['lane_vs_naive']:5.1f}x")
        coalesced, ratio = fig["small_coalesced_jobs_s"], fig["coalesced_vs_naive"]
        print(f"  hetbatch, submit_many coalesced {coalesced:10,.0f}  {ratio:5.1f}x")
        print(f"    (formed batches average {fig['small_avg_batch_rows']:.0f} rows)")
        print(
            f"    per job: {fig['small_cpu_us_per_job']:.0f} us of CPU (producer + worker + Redis), "
            f"{fig['small_redis_commands_per_job']:.3f} Redis commands"
        )
        print(
            f"  4 producer processes, no packing {fig['many_producers_jobs_s']:9,.0f}  "
            f"= {fig['many_producers_vs_noop']:.2f}x Celery no-op rate ({fig['celery_noop_tasks_s']:,.0f}/s)"
        )
        print(
            f"    the same on the lane          {fig['many_producers_lane_jobs_s']:9,.0f}  "
            f"= {fig['many_producers_lane_vs_noop']:.2f}x"
        )
        print(
            f"  model calls inside a worker draining the backlog ({fig['drain_avg_batch_rows']:.0f}-row batches): "
            f"{fig['worker_model_efficiency']:.2f}x in-process at that batch size"
        )
        print(f"  latency, 1-row jobs at 100/s: p50 {fig['latency_p50_ms']:.1f} ms, p99 {fig['latency_p99_ms']:.1f} ms")
        lane_p50, lane_p99 = fig["latency_lane_p50_ms"], fig["latency_lane_p99_ms"]
        print(f"    on the lane:                  p50 {lane_p50:.1f} ms, p99 {lane_p99:.1f} ms")
    ens = results.get("ensemble")
    if ens:
        print(f"\nensemble (soft vote of {', '.join(ens['members'])}), {ens['rows']:,} rows:")
        print(f"  members + fusion in-process, summed  {ens['inprocess_rows_s']:10,.0f} rows/s")
        print(
            f"  hetbatch end to end                  {ens['ensemble_e2e_rows_s']:10,.0f} rows/s"
            f"  ({ens['inprocess_sum_s_over_e2e_s']:.2f}x; labels equal {ens['labels_equal']:,}/{ens['rows']:,})"
        )


if __name__ == "__main__":
    sys.exit(main())
