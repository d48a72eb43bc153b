"""Priorities, deadlines and retention under a real backlog.

Everything is queued on a private Redis before any worker runs; then one worker with
one thread and a prefetch of one drains it. The order in which results are announced
on the producer's reply list (nobody drains it: the client does not listen) is the
order in which the worker finished the jobs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from hetbatch.producers import Client, ClientSettings, JobExpired, Status
from hetbatch.producers.protocol.wire import decode_notice
from tests.kit.helpers import ROOT, WorkerProcess, batch_stats, column, register
from tests.kit.models import Built, sklearn_model

INPUT_TTL_S, RESULT_TTL_S = 600, 120


@pytest.fixture(scope="module")
def models(work_dir: Path) -> dict[str, Built]:
    return {
        name: sklearn_model(work_dir / f"pd-{name}", name, "iris", kind=kind)
        for name, kind in (("pd-iris", "forest"), ("pd-expiring", "logreg"), ("pd-purged", "logreg"))
    }


def status_json(url: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "hetbatch", "--redis-url", url, "status", "--json", "--ping-timeout-s", "0"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout
    return dict(json.loads(out))


@pytest.fixture(scope="module")
def backlog(private_redis: str, work_dir: Path, models: dict[str, Built]) -> Iterator[dict[str, Any]]:
    # inline_max_bytes=0: every payload travels by reference, so its TTL can be checked.
    settings = ClientSettings.from_env(redis_url=private_redis, inline_max_bytes=0, input_ttl_s=INPUT_TTL_S)
    client = Client(settings, listen=False)
    r = redis.Redis.from_url(private_redis)
    refs = {name: register(client, built.directory) for name, built in models.items()}
    X = models["pd-iris"].X
    pieces = [X[i * 10 : i * 10 + 10] for i in range(12)]
    low = [client.submit("pd-iris", p, priority="low") for p in pieces[:6]]
    high = [client.submit("pd-iris", p, priority="high") for p in pieces[6:]]
    expiring = [client.submit("pd-expiring", X[:20], deadline_s=1.0) for _ in range(2)]
    purged = [client.submit("pd-purged", X[:30], priority=p) for p in ("low", "normal", "high")]
    input_ttls = [r.ttl(client.keys.input(job.id, 0)) for job in low + high]
    before = status_json(private_redis)
    report = client.purge("pd-purged")
    after_purge = status_json(private_redis)
    purged_inputs = sum(r.exists(client.keys.input(job.id, 0)) for job in purged)
    time.sleep(1.5)  # the expiring jobs' deadline passes while they wait in the queue
    worker = WorkerProcess(
        private_redis,
        work_dir,
        "--concurrency",
        "1",
        "--name",
        "backlog@localhost",
        env={
            "HETBATCH_PREFETCH_MULTIPLIER": "1",
            "HETBATCH_RESULT_TTL_S": str(RESULT_TTL_S),
            "HETBATCH_HEARTBEAT_INTERVAL_S": "0.5",
        },
    )
    try:
        results = {job.id: job.result(timeout_s=180) for job in low + high}
        for job in expiring:
            with pytest.raises(JobExpired):
                job.result(timeout_s=180)
        time.sleep(1.0)  # one more heartbeat, naming every model loaded by now
        yield {
            "client": client,
            "redis": r,
            "refs": refs,
            "low": low,
            "high": high,
            "pieces": pieces,
            "results": results,
            "expiring": expiring,
            "purged": purged,
            "report": report,
            "input_ttls": input_ttls,
            "before": before,
            "after_purge": after_purge,
            "purged_inputs": purged_inputs,
            "heartbeat": json.loads(r.get("hb:worker:backlog@localhost") or b"{}"),
        }
    finally:
        worker.stop()
        client.close()


def test_results_under_a_backlog_equal_in_process(backlog: dict[str, Any], models: dict[str, Built]) -> None:
    model = models["pd-iris"].model
    for job, piece in zip(backlog["low"] + backlog["high"], backlog["pieces"], strict=True):
        np.testing.assert_array_equal(column(backlog["results"][job.id], "label"), model.predict(piece))


def test_high_priority_jobs_finish_before_low_ones_submitted_earlier(backlog: dict[str, Any]) -> None:
    client: Client = backlog["client"]
    notices = backlog["redis"].lrange(client.keys.reply(client.id), 0, -1)
    order = [decode_notice(raw).job_id for raw in notices]
    high = [order.index(job.id) for job in backlog["high"]]
    low = [order.index(job.id) for job in backlog["low"]]
    assert max(high) < min(low), f"finish positions: high {high}, low {low}"
    assert low == sorted(low) and high == sorted(high)  # first in, first out within a priority


def test_expired_jobs_never_reach_the_model(backlog: dict[str, Any]) -> None:
    r: redis.Redis = backlog["redis"]
    ref = backlog["refs"]["pd-expiring"]
    for job in backlog["expiring"]:
        assert job.status() is Status.EXPIRED
    assert r.hgetall(f"hb:stats:{ref}") == {}  # no batch of that model ever ran
    iris = batch_stats(r, f"hb:stats:{backlog['refs']['pd-iris']}", lambda s: int(s.get(b"rows", 0)) >= 120)
    assert int(iris[b"rows"]) == 120
    assert backlog["refs"]["pd-iris"] in backlog["heartbeat"]["models"]
    assert ref not in backlog["heartbeat"]["models"]  # not even loaded


def test_status_shows_the_backlog_by_priority(backlog: dict[str, Any]) -> None:
    queued = backlog["before"]["queues"]["sklearn.cpu"]
    assert (queued["0"], queued["5"], queued["9"]) == (6 + 1, 2 + 1, 6 + 1)
    assert backlog["before"]["workers"] == []
    left = backlog["after_purge"]["queues"]["sklearn.cpu"]
    assert (left["0"], left["5"], left["9"]) == (6, 2, 6)


def test_purge_drops_the_queued_tasks_inputs_and_records_of_one_model(backlog: dict[str, Any]) -> None:
    assert backlog["report"].messages == 3 and backlog["report"].jobs == 3
    assert backlog["purged_inputs"] == 0
    for job in backlog["purged"]:
        assert job.status() is Status.LOST  # never ran, and its record is gone


def test_inputs_and_results_carry_their_ttls(backlog: dict[str, Any]) -> None:
    assert all(0 < ttl <= INPUT_TTL_S for ttl in backlog["input_ttls"])
    client: Client = backlog["client"]
    r: redis.Redis = backlog["redis"]
    job = backlog["high"][0]
    assert 0 < r.ttl(client.keys.result(job.id, 0)) <= RESULT_TTL_S
    assert not r.exists(client.keys.input(job.id, 0))  # the worker drops an input once used


def test_job_delete_drops_its_result_and_record(backlog: dict[str, Any]) -> None:
    client: Client = backlog["client"]
    job = backlog["high"][-1]
    assert job.status() is Status.DONE
    assert job.delete() == 4  # record, result, attempts, ledger task record (the input was gone already)
    assert job.status() is Status.LOST
    assert not backlog["redis"].exists(client.keys.result(job.id, 0), client.keys.job(job.id))
