"""A real worker's Prometheus endpoint and ``hetbatch status`` after real jobs.

The module has its own Redis and worker, so the counts it checks are exactly its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hetbatch.producers import Client, ClientSettings, JobFailed, PayloadTooLarge
from hetbatch.worker.devtools.redis_server import free_port
from tests.kit.helpers import ROOT, WorkerProcess, batch_stats, column, register
from tests.kit.models import Built, sklearn_model

WORKER_MAX_PAYLOAD_BYTES = 20_000
SIZES = (10, 40, 150)


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def worker(private_redis: str, work_dir: Path, metrics_port: int) -> Iterator[WorkerProcess]:
    env = {
        "HETBATCH_METRICS_PORT": str(metrics_port),
        "HETBATCH_METRICS_ADDRESS": "127.0.0.1",
        "HETBATCH_MAX_PAYLOAD_BYTES": str(WORKER_MAX_PAYLOAD_BYTES),
        "HETBATCH_HEARTBEAT_INTERVAL_S": "0.5",
    }
    proc = WorkerProcess(private_redis, work_dir, "--concurrency", "4", "--name", "metrics-test@localhost", env=env)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def iris(work_dir: Path) -> Built:
    return sklearn_model(work_dir / "metrics-iris", "metrics-iris", "iris")


@pytest.fixture(scope="module")
def ran(private_redis: str, worker: WorkerProcess, iris: Built) -> dict[str, Any]:
    """Three jobs one after the other (so each forms its own batch) and one too large for the worker."""
    with Client.from_url(private_redis) as client:
        ref = register(client, iris.directory)
        X = np.tile(iris.X, (10, 1))
        start = 0
        for rows in SIZES:
            piece = X[start : start + rows]
            out = client.predict(ref, piece, timeout_s=120)
            np.testing.assert_array_equal(column(out, "label"), iris.model.predict(piece))
            start += rows
        big = client.submit(ref, X[:1000])  # ~32 kB of float64: over the worker's limit, not the client's
        with pytest.raises(JobFailed) as failed:
            big.result(timeout_s=120)
    return {"ref": ref, "failed": failed.value}


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def settled(port: int, ref: str) -> dict[Any, float]:
    """Metrics once the counters caught up (they are updated just after the results are stored)."""
    deadline = time.monotonic() + 30
    while True:
        samples = scrape(port)
        jobs = sum(value(samples, "hetbatch_jobs_total", model=ref, outcome=o) or 0 for o in ("ok", "error"))
        if (jobs == len(SIZES) + 1 and value(samples, "hetbatch_batch_rows_count", model=ref) == len(SIZES)) or (
            time.monotonic() > deadline
        ):
            return samples
        time.sleep(0.2)


def test_the_batch_size_histogram_has_one_observation_per_model_call(metrics_port: int, ran: dict[str, Any]) -> None:
    samples = settled(metrics_port, ran["ref"])
    ref = ran["ref"]
    assert value(samples, "hetbatch_batch_rows_count", model=ref) == 3
    assert value(samples, "hetbatch_batch_rows_sum", model=ref) == sum(SIZES)
    assert value(samples, "hetbatch_batch_rows_bucket", model=ref, le="8.0") == 0
    assert value(samples, "hetbatch_batch_rows_bucket", model=ref, le="16.0") == 1
    assert value(samples, "hetbatch_batch_rows_bucket", model=ref, le="64.0") == 2
    assert value(samples, "hetbatch_batch_rows_bucket", model=ref, le="256.0") == 3
    assert value(samples, "hetbatch_batch_requests_sum", model=ref) == 3
    assert value(samples, "hetbatch_compute_seconds_count", model=ref) == 3
    assert value(samples, "hetbatch_queue_wait_seconds_count", model=ref) == 3


def test_jobs_rows_and_errors_are_counted_per_model_and_outcome(metrics_port: int, ran: dict[str, Any]) -> None:
    samples = settled(metrics_port, ran["ref"])
    ref = ran["ref"]
    assert value(samples, "hetbatch_jobs_total", model=ref, outcome="ok") == 3
    assert value(samples, "hetbatch_rows_total", model=ref, outcome="ok") == sum(SIZES)
    assert value(samples, "hetbatch_jobs_total", model=ref, outcome="error") == 1
    assert value(samples, "hetbatch_rows_total", model=ref, outcome="error") == 1000
    assert value(samples, "hetbatch_errors_total", model=ref, type="PayloadTooLarge") == 1
    load = value(samples, "hetbatch_model_load_seconds", model=ref)
    assert load is not None and load > 0
    for priority in ("0", "5", "9"):
        assert value(samples, "hetbatch_queue_depth", queue="sklearn.cpu", priority=priority) == 0


def test_the_redis_batch_stats_agree_with_the_metrics(private_redis: str, ran: dict[str, Any]) -> None:
    import redis

    r = redis.Redis.from_url(private_redis)
    stats = batch_stats(r, f"hb:stats:{ran['ref']}", lambda s: int(s.get(b"batches", 0)) >= 3)
    assert int(stats[b"batches"]) == 3
    assert int(stats[b"rows"]) == sum(SIZES)


def test_the_worker_checks_max_payload_bytes_again(ran: dict[str, Any]) -> None:
    failed: JobFailed = ran["failed"]
    assert failed.remote_type == "PayloadTooLarge"
    assert f"max_payload_bytes={WORKER_MAX_PAYLOAD_BYTES}" in str(failed)


def test_the_client_refuses_a_payload_over_its_limit(private_redis: str, ran: dict[str, Any], iris: Built) -> None:
    import redis

    settings = ClientSettings.from_env(redis_url=private_redis, max_payload_bytes=1000)
    with Client(settings) as client, pytest.raises(PayloadTooLarge, match="max_payload_bytes=1000"):
        client.submit(ran["ref"], iris.X)
    assert redis.Redis.from_url(private_redis).llen("sklearn.cpu:5") == 0


def test_status_lists_queues_workers_pools_and_loaded_models(private_redis: str, ran: dict[str, Any]) -> None:
    def status(*args: str) -> str:
        cmd = [sys.executable, "-m", "hetbatch", "--redis-url", private_redis, "status", *args]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout

    deadline = time.monotonic() + 30
    while ran["ref"] not in status("--ping-timeout-s", "0") and time.monotonic() < deadline:
        time.sleep(0.5)  # the heartbeat names a model from its next beat after the load
    report = json.loads(status("--json"))
    (me,) = [w for w in report["workers"] if w["name"] == "metrics-test@localhost"]
    assert me["pool"] == "cpu" and me["online"] is True and me["concurrency"] == 4
    assert me["models"] == {ran["ref"]: "sklearn.cpu"}
    assert "sklearn.cpu" in me["queues"] and report["queues"]["sklearn.cpu"]["0"] == 0
    table = status().splitlines()
    assert table[0].split()[:3] == ["QUEUE", "DEPTH", "BY"]
    (row,) = [line for line in table if line.split()[:1] == ["sklearn.cpu"]]  # not its host queue
    assert row.split()[:2] == ["sklearn.cpu", "0"]
    assert "metrics-test@localhost" in row and " cpu " in row and ran["ref"] in row and " yes " in row
