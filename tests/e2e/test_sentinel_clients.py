"""Through Redis Sentinel: the ``AsyncClient`` (across a failover) and the operator
commands (status, backlog, dlq, reconcile) given only a ``sentinel://`` URL.

A master, a replica and three sentinels (real ``redis-server`` / ``redis-sentinel``
processes, as in ``test_sentinel.py``), one real worker; every result is compared with
the model's in-process predictions.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import redis

from hetbatch.producers import Client
from hetbatch.producers.aio import AsyncClient
from hetbatch.producers.errors import HetbatchError
from hetbatch.producers.protocol.connect import connect
from hetbatch.producers.protocol.keys import Keys
from hetbatch.worker.cli import main
from hetbatch.worker.devtools.redis_server import RedisServer
from hetbatch.worker.ops.dlq import DeadLetters
from tests.e2e.test_sentinel import MASTER, Sentinels, needs_sentinel
from tests.kit.helpers import FAST_RECOVERY, WorkerProcess, column, register, wait_until
from tests.kit.models import Built, sklearn_model

pytestmark = needs_sentinel


class Group:
    """A master, its replica and three sentinels, with one worker on the sentinel URL."""

    def __init__(self, work_dir: Path) -> None:
        self.master = RedisServer()
        self.replica = RedisServer("--replicaof", "127.0.0.1", str(self.master.port))
        r = redis.Redis(port=self.replica.port)
        wait_until(lambda: r.info("replication").get("master_link_status") == "up", "replica in sync")
        self.sentinels = Sentinels(self.master.port)
        s = redis.Redis(port=self.sentinels.ports[0])

        def seen(field: str) -> int:
            return int(cast(dict[str, Any], s.sentinel_master(MASTER)).get(field, 0))

        wait_until(lambda: seen("num-other-sentinels") == 2, "sentinels meet")
        wait_until(lambda: seen("num-slaves") == 1, "sentinels see the replica")
        self.url = self.sentinels.url
        self.built: Built = sklearn_model(work_dir / "sentinel-aio-iris", "sentinel-aio-iris", "iris", trees=5)
        with Client.from_url(self.url) as client:
            self.ref = register(client, self.built.directory)
        self.worker = WorkerProcess(self.url, work_dir, "--concurrency", "4", env=FAST_RECOVERY)

    def stop(self) -> None:
        self.worker.stop()
        self.sentinels.stop()
        self.replica.stop()
        self.master.stop()


@pytest.fixture(scope="module")
def group(work_dir: Path) -> Iterator[Group]:
    g = Group(work_dir)
    yield g
    g.stop()


def test_operator_commands_take_a_sentinel_url(group: Group, capsys: pytest.CaptureFixture[str]) -> None:
    g = group

    def _cli(url: str, *args: str) -> str:
        """``hetbatch --redis-url url args...`` (in this process: one import of the stack)."""
        code = main(["--redis-url", url, *args])
        out, err = capsys.readouterr()
        assert code == 0, f"hetbatch {' '.join(args)}: {out}\n{err}"
        return out

    with Client.from_url(g.url) as client:  # the worker answers: queues and heartbeats exist
        np.testing.assert_array_equal(
            column(client.predict(g.ref, g.built.X[:4], timeout_s=60), "label"), g.built.model.predict(g.built.X[:4])
        )
    status = json.loads(_cli(g.url, "status", "--json", "--ping-timeout-s", "2"))
    assert "sklearn.cpu" in json.dumps(status) and len(status["workers"]) == 1, status
    backlog = json.loads(_cli(g.url, "backlog", "--json", "--queue", "sklearn.cpu"))
    assert set(backlog) == {"sklearn.cpu"}, backlog
    dead = DeadLetters(connect(g.url), Keys())
    task_id = dead.bury_raw(b'{"not": "an envelope"}', "planted by the test", queue="sklearn.cpu")
    assert task_id in _cli(g.url, "dlq", "list")
    assert "purged 1 task(s)" in _cli(g.url, "dlq", "purge", task_id)
    assert "the dead-letter list is empty" in _cli(g.url, "dlq", "list")
    assert "checked=" in _cli(g.url, "reconcile", "--once")


def test_async_client_takes_a_sentinel_url_and_follows_a_failover(group: Group) -> None:
    g = group
    X, model = g.built.X, g.built.model

    async def main() -> float:
        async with AsyncClient.from_url(g.url, publish_retries=7) as client:
            before = await client.predict(g.ref, X[:10], timeout_s=60)
            np.testing.assert_array_equal(column(before, "label"), model.predict(X[:10]))
            g.master.kill()
            killed = time.monotonic()
            while True:  # the first job submitted and answered through the new master
                try:
                    after = await client.predict(g.ref, X[10:30], timeout_s=10)
                    break
                except HetbatchError:
                    assert time.monotonic() - killed < 90, "no answer within 90 s of the kill"
            np.testing.assert_array_equal(column(after, "label"), model.predict(X[10:30]))
            return time.monotonic() - killed

    recovered_s = asyncio.run(main())
    assert g.sentinels.master_port() == g.replica.port
    assert g.worker.alive()
    print(f"\nAsyncClient through sentinel: first answer {recovered_s:.1f} s after the master was killed")
