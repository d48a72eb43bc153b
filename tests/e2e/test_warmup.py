"""The warm-up gate: a worker started with ``--preload`` takes no job before its models
are loaded and have answered their warm-up call.

The model's load sleeps 4 s (a big model), and its adapter logs the wall-clock start and
end of every call, the load's all-zero warm-up call included. Jobs are queued before the
worker starts. While the worker loads, all of them stay waiting in Redis (none reserved:
a warm worker could still take them); the first call on a job's rows starts after the
warm-up call ended; every answer equals the model's own in-process output.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import numpy as np
import redis

from hetbatch.producers import Client
from hetbatch.producers.protocol.keys import Keys
from hetbatch.worker.ops.backlog import QueueBacklog, measure
from tests.kit.faults import FaultyWorker
from tests.kit.helpers import column, register
from tests.kit.models import sklearn_model

QUEUE = "sklearn.cpu"
JOBS = 6
LOAD_S = 4.0
ENV = {"HETBATCH_SHM_DIR": "", "HETBATCH_LANE_SLOTS": "0"}
CALL = re.compile(r"faulty-call zeros=(\d) start=([\d.]+) end=([\d.]+)")


def test_preloaded_model_takes_no_job_before_its_warm_up_call(private_redis: str, work_dir: Path) -> None:
    slow = sklearn_model(
        work_dir / "warmup", "warmup", "iris", trees=3, options={"load_sleep_s": LOAD_S, "log_calls": True}
    )
    r = redis.Redis.from_url(private_redis)
    keys = Keys()
    started: list[FaultyWorker] = []
    try:
        with Client.from_url(private_redis) as client:
            ref = register(client, slow.directory)
            rows = [slow.X[i * 10 : i * 10 + 5] for i in range(JOBS)]
            jobs = [client.submit(ref, x) for x in rows]
            args = ("--concurrency", "4", "--queues", QUEUE, "--preload", "warmup")
            # FaultyWorker returns once the worker is ready: start it on a thread and watch
            # the queue and the log while it loads.
            thread = threading.Thread(
                target=lambda: started.append(FaultyWorker(private_redis, work_dir, *args, env=ENV))
            )
            thread.start()
            loading: list[QueueBacklog] = []
            deadline = time.monotonic() + 60
            log_file: Path | None = None
            while time.monotonic() < deadline:
                logs = sorted(work_dir.glob("faulty-worker-*.log"), key=lambda p: p.stat().st_mtime)
                log_file = logs[-1] if logs else None
                text = log_file.read_text(errors="replace") if log_file else ""
                if "loaded and warmed up" in text:
                    break
                if "preload warmup@1: loading" in text:
                    loading.append(measure(r, keys, [QUEUE])[QUEUE])
                time.sleep(0.1)
            thread.join(timeout=60)
            assert started, "the worker did not start"
            worker = started[0]
            print(f"{len(loading)} snapshots of the queue while the model loaded; the last: {loading[-1]}")
            assert len(loading) >= 10, "the load was not watched"
            assert all(q.waiting == JOBS and q.reserved == 0 and q.held == 0 for q in loading), loading
            for i, job in enumerate(jobs):
                np.testing.assert_array_equal(column(job.result(timeout_s=30), "label"), slow.model.predict(rows[i]))
            out = worker.output()
            calls = [(int(z), float(s), float(e)) for z, s, e in CALL.findall(out)]
            warm_end = max(e for z, _, e in calls if z)
            first_job = min(s for z, s, _ in calls if not z)
            print("\n".join(line for line in out.splitlines() if "preload" in line or "faulty-call" in line))
            print(f"warm-up call ended {first_job - warm_end:.3f} s before the first call on a job's rows")
            assert warm_end < first_job
            assert out.index("loaded and warmed up") < out.index(" ready.")
    finally:
        for w in started:
            w.stop()
