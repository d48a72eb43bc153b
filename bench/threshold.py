"""Where should payloads stop riding inside the task message? Measures jobs/s for
payload sizes from 1 KiB to 1 MiB, inline (base64 in the JSON message) and by
reference (a Redis key), side by side against one real worker.

    python -m bench.threshold [--jobs 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

import numpy as np

from bench.setup import ROOT, build_models, start_worker, stop_process
from hetbatch.producers import Client
from hetbatch.worker.devtools.redis_server import RedisServer


def rate(client: Client, X: np.ndarray, jobs: int) -> float:
    started = time.perf_counter()
    pending = [client.submit("onnx-mlp", X) for _ in range(jobs)]
    for job in pending:
        job.result(timeout_s=300)
    return jobs / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=200)
    args = parser.parse_args(argv)
    work = ROOT / ".bench"
    work.mkdir(exist_ok=True)
    rows_per_kib = 8  # 32 float32 features = 128 bytes a row
    results = []
    with RedisServer() as server:
        models = build_models(work / "models", ["onnx-mlp"])
        worker = start_worker(server.url, work / "threshold-worker.log")
        try:
            from hetbatch.worker.modelops.registration import build_spec

            with Client.from_url(server.url) as base:
                base.registry.register(build_spec(models["onnx-mlp"].directory))
                inline = Client(replace(base.settings, inline_max_bytes=1 << 30))
                by_ref = Client(replace(base.settings, inline_max_bytes=0))
                for kib in (1, 4, 16, 64, 256, 1024):
                    X = np.random.default_rng(0).standard_normal((kib * rows_per_kib, 32)).astype(np.float32)
                    inline.predict("onnx-mlp", X)
                    by_ref.predict("onnx-mlp", X)
                    a, b = rate(inline, X, args.jobs), rate(by_ref, X, args.jobs)
                    results.append({"payload_kib": kib, "inline_jobs_s": a, "by_reference_jobs_s": b})
                    print(f"{kib:5d} KiB  inline {a:8.0f} jobs/s   by reference {b:8.0f} jobs/s   ratio {a / b:5.2f}")
                inline.close()
                by_ref.close()
        finally:
            stop_process(worker)
    (work / "threshold.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
