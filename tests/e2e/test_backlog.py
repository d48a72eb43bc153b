"""The autoscaling signal counts what a list length misses: prefetched and running Celery
tasks (kombu's unacked hash) and lane jobs a worker holds.

A real worker runs a model that sleeps 6 s per call, so the jobs stay unfinished long
enough to be counted; ``hetbatch backlog`` (the real command) and the worker's metrics
endpoint report the same numbers as the library.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from hetbatch.producers import Client
from hetbatch.producers.protocol.keys import Keys
from hetbatch.producers.protocol.kombu import priority_lists
from hetbatch.worker.devtools.redis_server import free_port
from hetbatch.worker.ops.backlog import QueueBacklog, measure
from tests.kit.faults import FaultyWorker
from tests.kit.helpers import ROOT, column, register
from tests.kit.models import Built, sklearn_model

JOBS = 12
QUEUE = "sklearn.cpu"


@pytest.fixture(scope="module")
def slow(work_dir: Path) -> Built:
    return sklearn_model(work_dir / "backlog-slow", "backlog-slow", "iris", trees=3, options={"sleep_s": 6.0})


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def worker(private_redis: str, work_dir: Path, metrics_port: int) -> Iterator[FaultyWorker]:
    env = {"HETBATCH_METRICS_PORT": str(metrics_port), "HETBATCH_METRICS_ADDRESS": "127.0.0.1", "HETBATCH_SHM_DIR": ""}
    proc = FaultyWorker(private_redis, work_dir, "--concurrency", "2", "--queues", QUEUE, env=env)
    yield proc
    proc.stop()


def wait_for(
    found: Callable[[], QueueBacklog], ready: Callable[[QueueBacklog], bool], timeout_s: float
) -> QueueBacklog:
    deadline = time.monotonic() + timeout_s
    while True:
        now = found()
        if ready(now) or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def cli_backlog(url: str) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-m", "hetbatch", "--redis-url", url, "backlog", "--json", "--queue", QUEUE],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return dict(json.loads(out.stdout)[QUEUE])


def scraped(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        s.labels["state"]: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "hetbatch_backlog" and s.labels["queue"] == QUEUE
    }


def run_and_check(client: Client, slow: Built, r: redis.Redis, url: str, port: int, state: str) -> None:
    ref = register(client, slow.directory)
    keys = Keys()

    def now() -> QueueBacklog:
        return measure(r, keys, [QUEUE])[QUEUE]

    jobs = [client.submit(ref, slow.X[i : i + 1]) for i in range(JOBS)]
    # Taken by the worker (reserved or held) before the first 6 s call has ended.
    # A message kombu has popped but not yet recorded as unacked is briefly in neither place.
    seen = wait_for(now, lambda b: getattr(b, state) > 0 and b.total == JOBS, timeout_s=30)
    listed = sum(int(r.llen(k)) for k in priority_lists(QUEUE))
    print(f"{state}: backlog {seen} while the priority lists held {listed}")
    assert seen.total == JOBS and getattr(seen, state) > 0 and listed < JOBS
    cli = cli_backlog(url)
    metric = scraped(port)
    print(f"hetbatch backlog: {cli}; metrics endpoint: {metric}")
    # The CLI and the scrape take a few seconds on a loaded machine: by then the first two calls
    # (concurrency 2) may have ended, never more.
    assert JOBS - 2 <= cli["total"] <= JOBS and cli[state] > 0
    assert JOBS - 2 <= sum(metric.values()) <= JOBS and metric[state] > 0
    for i, job in enumerate(jobs):
        np.testing.assert_array_equal(column(job.result(timeout_s=120), "label"), slow.model.predict(slow.X[i : i + 1]))
    assert wait_for(now, lambda b: b.total == 0, timeout_s=30) == QueueBacklog()


def test_prefetched_and_running_celery_tasks_count_as_reserved(
    private_redis: str, worker: FaultyWorker, slow: Built, metrics_port: int
) -> None:
    r = redis.Redis.from_url(private_redis)
    with Client.from_url(private_redis) as client:
        run_and_check(client, slow, r, private_redis, metrics_port, "reserved")


def test_lane_jobs_a_worker_runs_count_as_held(
    private_redis: str, worker: FaultyWorker, slow: Built, metrics_port: int
) -> None:
    r = redis.Redis.from_url(private_redis)
    with Client.from_url(private_redis, lane_max_rows=16) as client:
        run_and_check(client, slow, r, private_redis, metrics_port, "held")
