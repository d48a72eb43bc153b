"""A dataset run side by side with an in-process loop: 20 hive-partitioned Parquet files.

Builds the demo's ONNX forest (30 float32 features), writes ``--files`` Parquet files
partitioned by date (``date=2024-01-01/part-0.parquet`` ...; ``--rows`` in all), starts a
private Redis and one CPU worker, then runs, each in a child process measured alike:

1. ``hetbatch run`` over the folder (output parts mirror the input, manifest, commit);
2. an in-process loop doing the same read -> score -> write with onnxruntime.

Each side runs ``--repeats`` times, in turns. It prints the median rows/s of both (and
their ranges), the ratio of the medians, each client's largest peak RSS, and checks the
two outputs equal row by row (labels equal, probabilities within 1e-6).

Usage: ``python -m bench.etl_dataset [--rows 10000000] [--files 20] [--batch-rows 65536] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench.etl_memory import _mib, _run_measured

ROOT = Path(__file__).resolve().parent.parent


def write_dataset(root: Path, features: list[str], rows: int, files: int) -> list[Path]:
    """``files`` hive-partitioned Parquet files of about ``rows / files`` rows (kept when present)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_breast_cancer

    base = load_breast_cancer().data.astype(np.float32)
    rng = np.random.default_rng(42)
    paths, start = [], 0
    for k in range(files):
        n = rows // files + (1 if k < rows % files else 0)
        path = root / f"date={dt.date(2024, 1, 1) + dt.timedelta(days=k)}" / "part-0.parquet"
        paths.append(path)
        if path.exists() and pq.ParquetFile(path).metadata.num_rows == n:
            start += n
            continue
        X = base[rng.integers(0, len(base), n)] * rng.normal(1.0, 0.05, (n, base.shape[1])).astype(np.float32)
        path.parent.mkdir(parents=True, exist_ok=True)
        columns = {"id": pa.array(np.arange(start, start + n))} | {f: pa.array(X[:, j]) for j, f in enumerate(features)}
        pq.write_table(pa.table(columns), path, row_group_size=256 * 1024)
        start += n
    return paths


def in_process(model: str, source: str, target: str, batch_rows: int) -> None:
    """The baseline: for each file, read batches, score with onnxruntime, write the same columns."""
    import onnxruntime as ort
    import pyarrow as pa
    import pyarrow.parquet as pq

    first = next(Path(source).rglob("*.parquet"))
    features = [n for n in pq.read_schema(first).names if n != "id"]
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    for path in sorted(Path(source).rglob("*.parquet")):
        out = Path(target) / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        writer = None
        for batch in pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=batch_rows):
            X = np.stack([batch.column(f).to_numpy() for f in features], axis=1)
            label, proba = session.run(None, {"X": X})
            probs = pa.FixedSizeListArray.from_arrays(pa.array(proba.ravel()), proba.shape[1])
            table = pa.table({"id": batch.column("id"), "label": label, "probabilities": probs})
            writer = writer or pq.ParquetWriter(out, table.schema)
            writer.write_table(table)
        if writer is not None:
            writer.close()


def compare(paths: list[Path], data: Path, queued: Path, local: Path) -> tuple[int, float]:
    """(rows equal, max |probability difference|) between the two outputs, file by file."""
    import pyarrow.parquet as pq

    same, worst = 0, 0.0
    for path in paths:
        rel = path.relative_to(data)
        a, b = pq.read_table(queued / rel), pq.read_table(local / rel)
        assert a.column("id").equals(b.column("id")), f"{rel}: ids differ"
        same += int((a.column("label").to_numpy() == b.column("label").to_numpy()).sum())
        pa_, pb = (np.stack(t.column("probabilities").to_numpy(zero_copy_only=False)) for t in (a, b))
        worst = max(worst, float(np.abs(pa_ - pb).max()))
    return same, worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--batch-rows", type=int, default=65_536)
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, taken in turns")
    parser.add_argument("--rss-bound-mib", type=float, default=400.0)
    parser.add_argument("--workdir", default=str(ROOT / ".bench" / "etl_dataset"))
    parser.add_argument("--in-process", nargs=3, metavar=("MODEL", "SOURCE", "TARGET"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.in_process:  # the measured child: imports no more than the loop needs
        in_process(*args.in_process, args.batch_rows)
        return 0

    from hetbatch.worker.devtools.demo import _build_models, _start_worker  # the demo's model

    root = Path(args.workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)

    from hetbatch.producers import Client
    from hetbatch.worker.devtools.redis_server import RedisServer
    from hetbatch.worker.modelops.registration import build_spec

    print(f"building the model and {args.files} hive-partitioned files ({args.rows:,} rows) in {root} ...", flush=True)
    _, features = _build_models(root)
    data = root / "events"
    paths = write_dataset(data, features, args.rows, args.files)
    server = RedisServer()
    worker: Any = None
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        with Client.from_url(server.url) as client:
            ref = client.registry.register(build_spec(root / "forest-onnx")).ref
        worker = _start_worker(server.url, root / "worker.log")
        with Client.from_url(server.url) as client:  # the worker loads the model before the clock starts
            client.predict(ref, {"X": np.zeros((1, len(features)), np.float32)}, timeout_s=120)
        cmd = [sys.executable, "-m", "hetbatch", "--redis-url", server.url, "run", "--model", ref,
               "--input", str(data), "--output", str(root / "scored"), "--keep", "id", "--restart", "--quiet",
               "--batch-rows", str(args.batch_rows), "--in-flight", str(args.in_flight)]  # fmt: skip
        base = [sys.executable, "-m", "bench.etl_dataset", "--workdir", str(root), "--batch-rows", str(args.batch_rows)]
        local = root / "in-process"
        loop = [*base, "--in-process", str(root / "forest-onnx" / "model.onnx"), str(data), str(local)]
        runs: dict[str, list[tuple[float, int]]] = {"queue": [], "local": []}
        for k in range(args.repeats):  # in turns: a slow spell of the machine falls on both sides
            for side, argv in (("queue", cmd), ("local", loop)):
                code, seconds, rss = _run_measured(argv, env, root)
                if code:
                    print(f"{side} run failed with exit code {code}", file=sys.stderr)
                    return code
                runs[side].append((seconds, rss))
                print(f"  run {k + 1}/{args.repeats} {side}: {seconds:.2f} s, peak RSS {_mib(rss)}", flush=True)
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=30)
        server.stop()
    same, worst = compare(paths, data, root / "scored", local)
    queued_s, local_s = (statistics.median(s for s, _ in runs[side]) for side in ("queue", "local"))
    queued_rss = max(r for _, r in runs["queue"])
    ratio = local_s / queued_s
    print()
    print(f"dataset run over {args.files} hive-partitioned Parquet files, {args.rows:,} rows (30 float32 features)")
    print(f"medians of {args.repeats} runs of each side, taken in turns (range in rows/s); peak RSS: the largest")
    for label, side in (("hetbatch run (queue)", "queue"), ("in-process loop", "local")):
        rates = sorted(args.rows / s for s, _ in runs[side])
        seconds = statistics.median(s for s, _ in runs[side])
        rss = max(r for _, r in runs[side])
        print(
            f"  {label:26} {seconds:7.2f} s = {args.rows / seconds:>11,.0f} rows/s "
            f"({rates[0]:,.0f}-{rates[-1]:,.0f})  peak RSS {_mib(rss)}"
        )
    ratios = sorted(lo / q for (q, _), (lo, _) in zip(runs["queue"], runs["local"], strict=True))
    print(f"  ratio queue / in-process   {ratio:7.2f} (target >= 0.85; run by run {ratios[0]:.2f}-{ratios[-1]:.2f})")
    within = queued_rss < args.rss_bound_mib * 2**20
    print(f"  client peak RSS bound      {_mib(queued_rss)} < {args.rss_bound_mib:.0f} MiB: {within}")
    print(f"  labels equal               {same:,}/{args.rows:,}; max |prob diff| {worst:.2e}")
    return 0 if same == args.rows and worst <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
