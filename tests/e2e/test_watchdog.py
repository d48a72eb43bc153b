"""The worker's watchdog: leases keep a long task from being redelivered behind the back
of the live worker that holds it, and only the leader's watchdog sweeps the ledger."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from hetbatch.producers import Client
from hetbatch.producers.protocol.keys import Keys
from hetbatch.worker.devtools.redis_server import RedisServer
from hetbatch.worker.settings import WorkerSettings
from hetbatch.worker.watchdog import Watchdog
from tests.kit.broker import wait_for
from tests.kit.faults import FaultyWorker
from tests.kit.helpers import FAST_RECOVERY, column, register
from tests.kit.models import sklearn_model


def test_the_watchdog_takes_the_leader_lock_and_stops_when_told(redis_server: RedisServer) -> None:
    settings = WorkerSettings(redis_url=redis_server.url, lease_interval_s=0.05, reconcile_interval_s=0.1)
    dogs = [Watchdog(settings), Watchdog(settings)]
    for dog in dogs:
        dog.start()
    r = redis.Redis.from_url(redis_server.url)
    leader = Keys(settings.prefix).leader()
    wait_for(lambda: r.get(leader) is not None, timeout_s=5, what="a leader")
    time.sleep(0.3)
    holders = {r.get(leader)}
    assert len(holders) == 1  # one holder, kept across ticks
    assert dogs[0].renew_leases() == 0  # outside a Celery worker nothing is held
    for dog in dogs:
        dog.stop()
        dog.join(timeout=5)
    assert not any(dog.is_alive() for dog in dogs)
    assert "hetbatch-watchdog" not in {t.name for t in threading.enumerate()}


@pytest.mark.slow
def test_a_task_longer_than_the_visibility_timeout_runs_once(redis_server: RedisServer, tmp_path: Path) -> None:
    """Visibility timeout 8 s, a 12 s model call: without the lease kombu would hand the
    message to the second worker while the first still runs it."""
    built = sklearn_model(tmp_path / "slow-iris", "slow-iris", options={"sleep_s": 12.0})
    workers = [FaultyWorker(redis_server.url, tmp_path, env=FAST_RECOVERY) for _ in range(2)]
    try:
        with Client.from_url(redis_server.url) as client:
            register(client, built.directory)
            job = client.submit("slow-iris", built.X[:5])
            np.testing.assert_array_equal(column(job.result(timeout_s=90), "label"), built.model.predict(built.X[:5]))
            assert [a.number for a in job.attempts()] == [1]
            counters = client.ledger.counters()
            assert counters.get("duplicates", 0) == 0 and counters.get("duplicate_deliveries", 0) == 0
    finally:
        for w in workers:
            w.stop()
