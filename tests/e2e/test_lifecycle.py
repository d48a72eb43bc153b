"""A job's lifecycle on a real private Redis with real workers (docs/reliability.md): a
deleted or purged job never runs (not from a queue, the lane, a redelivery or the
reconciler), every key it owned goes at once, reading it says it was deleted; a stream
keeps Redis bounded by its window; pandas, numpy and Arrow meet one NaN policy."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from hetbatch.producers import Client, JobDeleted, SchemaMismatch
from hetbatch.producers.protocol import shm
from hetbatch.producers.protocol.keys import lane_list
from hetbatch.producers.protocol.schema import TensorSpec, to_table
from hetbatch.worker.devtools.redis_server import RedisServer
from hetbatch.worker.ops.reconciler import Reconciler, Republisher
from hetbatch.worker.ops.status import census
from tests.kit.broker import ledger_envelope, queued_task_ids, wait_for
from tests.kit.helpers import FAST_RECOVERY, WorkerProcess, column, register
from tests.kit.models import Built, sklearn_model


@pytest.fixture()
def tmp_path(shm_path: Path) -> Path:
    """This module's folders live on tmpfs (see ``shm_path`` in tests/conftest.py)."""
    return shm_path


KEYS_PER_JOB = 5
"""What a job in flight can own at most: record, input, ledger record, attempts, result."""


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    work = tmp_path_factory.mktemp("lifecycle")
    return {name: sklearn_model(work / name, name, trees=5) for name in ("life-gone", "life-kept")}


@pytest.fixture()
def client(redis_server: RedisServer, models: dict[str, Built]) -> Iterator[Client]:
    # Inputs over 1 KiB go by Redis key, so both kinds of payload are covered.
    with Client.from_url(redis_server.url, inline_max_bytes=1024, lane_max_rows=8) as c:
        for built in models.values():
            register(c, built.directory)
        yield c


def _owned(client: Client, units: list[str]) -> list[bytes]:
    """Every key naming one of ``units`` but their tombstones, and their ledger entries."""
    tombs = {client.keys.gone(u).encode() for u in units}
    found = [
        k
        for k in client.redis.scan_iter(match="*", count=1000)
        if k not in tombs and any(u.encode() in k for u in units)
    ]
    ledger = [t for t in client.redis.zrange(client.keys.ledger(), 0, -1) if any(u.encode() in t for u in units)]
    return sorted(found + ledger)


def _files(folder: str) -> list[str]:
    """Payload files in a shared-memory folder (not its host token)."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith("hetbatch-in-"))


def _republished(client: Client) -> list[str]:
    published: list[str] = []
    rec = Reconciler(client.redis, client.keys, lambda body, queue, tid: published.append(tid), overdue_s=0)
    for _ in range(3):  # it acts on a task found missing twice in a row
        rec.sweep()
    return published


def test_purged_jobs_never_run_from_any_queue_the_lane_a_redelivery_or_the_reconciler(
    client: Client, models: dict[str, Built], redis_server: RedisServer, tmp_path: Path
) -> None:
    X, queue = models["life-gone"].X, client.spec("life-gone").queue
    # As a lane-draining worker's heartbeat does: small normal-priority jobs take the lane.
    client.redis.set(client.keys.alive(lane_list(queue)), "test", px=60_000)
    gone = [client.submit("life-gone", X[i : i + 3]) for i in range(20)]
    gone += [client.submit("life-gone", X[i : i + 20], priority="high") for i in range(15)]
    gone += [client.submit("life-gone", X[i : i + 60], priority="low", chunk_rows=20) for i in range(15)]
    assert client.redis.llen(lane_list(queue)) == 20
    kept = [(client.submit("life-kept", X[i : i + 10], priority=p), X[i : i + 10]) for i, p in
            enumerate(["high", "normal", "low", "normal"])]  # fmt: skip
    # A message a worker had reserved comes back after its death: the same body, the same task id.
    body = ledger_envelope(client, f"{gone[20].id}.0")[1]
    lane_entry = client.redis.lindex(lane_list(queue), 0)
    report = client.purge("life-gone")
    assert (report.messages, report.jobs) == (20 + 15 + 15 * 3, 50)
    units = [j.id for j in gone]
    assert _owned(client, units) == []
    assert all(client.redis.get(client.keys.gone(u)) == b"purged" for u in units)
    assert _republished(client) == []
    with Republisher(redis_server.url) as pub:  # the redeliveries
        pub.publish(body, queue, f"{gone[20].id}.0")
    client.redis.rpush(lane_list(queue), lane_entry)
    worker = WorkerProcess(redis_server.url, tmp_path, env=FAST_RECOVERY)  # its reconciler sweeps every second
    try:
        kept_model = models["life-kept"].model
        for job, rows in kept:
            np.testing.assert_array_equal(column(job.result(timeout_s=60), "label"), kept_model.predict(rows))
        wait_for(lambda: client.ledger.counters().get("gone_deliveries", 0) >= 2, 30, "the redeliveries dropped")
        time.sleep(4)  # a few more sweeps of the worker's reconciler (HETBATCH_RECONCILE_INTERVAL_S=1)
        assert _republished(client) == []
    finally:
        worker.stop()
    assert queued_task_ids(client, "life-gone") == [] and client.redis.llen(lane_list(queue)) == 0
    assert not client.redis.exists(client.keys.batch_stats(f"life-gone@{client.spec('life-gone').version}"))
    assert client.redis.exists(client.keys.batch_stats(f"life-kept@{client.spec('life-kept').version}"))
    assert _owned(client, units) == []  # nothing ran, so nothing came back
    with pytest.raises(JobDeleted, match="purged"):
        gone[0].result(timeout_s=5)
    with pytest.raises(JobDeleted, match="purged"):
        client.job(gone[40].id)


def test_a_deleted_small_chunked_packed_or_shared_memory_job_leaves_nothing(
    redis_server: RedisServer, models: dict[str, Built], tmp_path: Path
) -> None:
    folder = str(tmp_path / "shm")
    Path(folder).mkdir()
    token = shm.host_token(folder, create=True)
    assert token is not None
    with Client.from_url(redis_server.url, inline_max_bytes=1024, shm_dir=folder, shm_min_bytes=10_000) as client:
        register(client, models["life-gone"].directory)
        X = models["life-gone"].X
        small = client.submit("life-gone", X[:3])  # inline: its input rides in the message
        chunked = client.submit("life-gone", X, chunk_rows=50)  # three chunks, inputs by key
        packed = client.submit_many("life-gone", [X[i : i + 2] for i in range(5)])
        queue = client.spec("life-gone").queue
        client.redis.set(client.keys.alive(shm.host_queue(queue, token)), "test", px=60_000)
        shared = client.submit("life-gone", np.repeat(X, 4, axis=0))  # ~19 KB: a shared-memory file
        assert chunked.chunks == 3 and len({j.unit for j in packed}) == 1 and len(_files(folder)) == 1
        jobs = [small, chunked, packed[0], shared]
        units = [j.unit for j in jobs]
        assert all(_owned(client, [u]) for u in units)  # each has keys to lose
        for job in jobs:
            assert job.delete() >= 2  # its record and its ledger record at least
        assert _owned(client, units) == []
        assert _files(folder) == []
        assert all(client.redis.get(client.keys.gone(u)) == b"deleted" for u in units)
        assert _republished(client) == []
        for job in jobs:
            with pytest.raises(JobDeleted, match="deleted"):
                job.result(timeout_s=5)
        with pytest.raises(JobDeleted, match="deleted"):
            client.job(chunked.id)


def test_a_stream_of_1000_batches_keeps_redis_within_its_window(
    client: Client, models: dict[str, Built], redis_server: RedisServer, tmp_path: Path
) -> None:
    X, model = models["life-kept"].X, models["life-kept"].model
    window, most = 4, 0
    batches = [X[i % 148 : i % 148 + 2] for i in range(1000)]
    worker = WorkerProcess(redis_server.url, tmp_path, env=FAST_RECOVERY)
    try:
        for n, (batch, table) in enumerate(client.map("life-kept", batches, max_in_flight=window)):
            np.testing.assert_array_equal(column(table, "label"), model.predict(batch))
            most = max(most, sum(census(client.redis, client.keys).values()))
            assert most <= KEYS_PER_JOB * (window + 1), f"{most} job keys after batch {n}"
    finally:
        worker.stop()
    assert census(client.redis, client.keys) == dict.fromkeys(census(client.redis, client.keys), 0)


def test_nan_meets_the_same_policy_from_pandas_numpy_and_arrow() -> None:
    spec = [TensorSpec("X", "float64", (2,), columns=("a", "b"))]
    rows = np.array([[1.0, np.nan], [2.0, 3.0]])
    frame = pd.DataFrame({"a": rows[:, 0], "b": rows[:, 1]})
    arrow = pa.table({"a": rows[:, 0], "b": rows[:, 1]})
    for data in (frame, arrow, {"X": rows}):
        got = to_table(data, spec).column("X").combine_chunks()
        assert got.null_count == 0  # a NaN is a value: the model's nan policy judges it on the worker
        np.testing.assert_array_equal(got.flatten().to_numpy().reshape(2, 2), rows)
    # A missing value is not a NaN: pandas' own marker stays a null, refused whatever the policy.
    with pytest.raises(SchemaMismatch, match="null"):
        to_table(pd.DataFrame({"a": pd.array([1.0, None], dtype="Float64"), "b": [2.0, 3.0]}), spec)
