"""``wait_replicas``: a submit returns only once that many replicas hold it (Redis
``WAIT`` on the transaction's own connection), and raises ``BrokerError`` naming the
count when they do not confirm in time. A real master and replica (``redis-server``
processes on free ports); the replica is read directly, right after ``submit`` returns.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from hetbatch.producers import BrokerError, Client, ConfigError
from hetbatch.producers.protocol.keys import Keys
from hetbatch.worker.devtools.redis_server import RedisServer
from tests.kit.helpers import register, wait_until
from tests.kit.models import sklearn_model


def test_a_submit_returns_once_a_replica_holds_it_and_fails_clearly_without_one(tmp_path: Path) -> None:
    master = RedisServer()
    replica = RedisServer("--replicaof", "127.0.0.1", str(master.port))
    try:
        on_replica = redis.Redis(port=replica.port)
        wait_until(lambda: on_replica.info("replication").get("master_link_status") == "up", "replica in sync")
        built = sklearn_model(tmp_path / "wait-iris", "wait-iris", "iris", trees=3)
        url = master.url
        with Client.from_url(url, wait_replicas=1, wait_timeout_ms=300) as client:
            ref = register(client, built.directory)
            keys = Keys(client.settings.prefix)
            for i in range(50):  # replication is asynchronous: without WAIT some would not be there yet
                job = client.submit(ref, built.X[i : i + 1])
                assert on_replica.exists(keys.job(job.unit)), f"submit {i} returned before the replica had it"
            replica.kill()
            on_master = redis.Redis(port=master.port)
            wait_until(lambda: on_master.info("replication")["connected_slaves"] == 0, "replica gone")
            started = time.monotonic()
            with pytest.raises(BrokerError, match=r"0 of 1 replicas .* within 300 ms"):
                client.submit(ref, built.X[:1])
            assert time.monotonic() - started < 5, "a missing replica must cost the timeout, not a hang"
    finally:
        replica.stop()
        master.stop()


def test_settings_that_would_hang_or_fail_after_the_transaction_are_refused_at_start() -> None:
    with RedisServer() as server:
        for bad in [{"wait_replicas": 1, "wait_timeout_ms": 0}, {"wait_replicas": -1}]:
            with pytest.raises(ConfigError, match="wait_timeout_ms at least 1"):
                Client.from_url(server.url, **bad)


def test_a_redis_that_refuses_wait_after_running_the_submit_says_so(tmp_path: Path) -> None:
    with RedisServer() as server:
        admin = redis.Redis(port=server.port)
        admin.acl_setuser(
            "nowait", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"], commands=["+@all", "-wait"]
        )
        built = sklearn_model(tmp_path / "nowait-iris", "nowait-iris", "iris", trees=3)
        url = f"redis://nowait:pw@127.0.0.1:{server.port}/0"
        with Client.from_url(url, wait_replicas=1, wait_timeout_ms=300) as client:
            ref = register(client, built.directory)
            records = client.keys.job("*")
            before = len(admin.keys(records))
            with pytest.raises(BrokerError, match=r"ran the submit but refused WAIT \(.*'wait' command\)"):
                client.submit(ref, built.X[:1])
            assert len(admin.keys(records)) == before + 1, "the message says the job may run: it is there"
