"""Redis SIGKILLed at every step of a producer's round trip (AOF, ``appendfsync always``).

A proxy (tests/kit/proxy.py) between the client and a redis-server of the test's own
counts the commands it forwards and kills the server before the first command of a
call, or after any one of them has been processed and written to the AOF but before
its reply reaches the client; the server is restarted at once on the same port and
AOF. For ``submit`` (payload by key, several chunks), ``submit_many``, a lane job and
a shared-memory job, and for a client whose caches are cold (its registry and queue
reads are cut too), every call must either raise ``BrokerError`` or return a job that
a worker started afterwards answers, equal to the model in-process: 0 accepted jobs
lost over at least 200 kills.
"""

from __future__ import annotations

import collections
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from hetbatch.producers import BrokerError, Client, ClientSettings
from hetbatch.producers.protocol import shm
from hetbatch.producers.protocol.keys import Keys, lane_list
from hetbatch.worker.devtools.redis_server import RedisServer, free_port
from tests.kit.helpers import FAST_RECOVERY, WorkerProcess, column, register
from tests.kit.models import Built, sklearn_model
from tests.kit.proxy import KillingProxy


@pytest.fixture()
def tmp_path(shm_path: Path) -> Path:
    """This module's folders live on tmpfs (see ``shm_path`` in tests/conftest.py)."""
    return shm_path


QUEUE = "sklearn.cpu"
MIN_KILLS = int(os.environ.get("HETBATCH_FAULT_KILLS", "200"))


class _AofRedis:
    """A redis-server with AOF ``always`` that can be SIGKILLed and restarted on the same port and files."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="hetbatch-faults-")
        self.args = ("--dir", self.dir, "--appendonly", "yes", "--appendfsync", "always")
        self.server = RedisServer(*self.args, port=self.port)
        self.url = self.server.url

    def kill_and_restart(self) -> None:
        self.server.kill()
        self.server = RedisServer(*self.args, port=self.port)

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture()
def aof() -> Iterator[_AofRedis]:
    server = _AofRedis()
    yield server
    server.stop()


def _equal(built: Built, x: np.ndarray, table: Any) -> bool:
    return bool(
        np.array_equal(column(table, "label"), built.model.predict(x))
        and np.allclose(column(table, "probabilities"), built.model.predict_proba(x), atol=1e-6)
    )


def test_a_redis_killed_at_any_step_of_a_round_trip_loses_no_accepted_job(aof: _AofRedis, tmp_path: Path) -> None:
    built = sklearn_model(tmp_path / "iris", "faults-iris", "iris")
    folder = tmp_path / "shm"
    folder.mkdir()
    token = shm.host_token(str(folder), create=True)
    assert token is not None
    keys = Keys()
    direct = redis.Redis.from_url(aof.url)
    # No worker yet: the queues a producer sends to only while a worker lives are said alive
    # for the test's length (the keys are in the AOF too); the worker started at the end takes over.
    for queue in (shm.host_queue(QUEUE, token), lane_list(QUEUE)):
        direct.set(keys.alive(queue), "test", ex=3600)
    proxy = KillingProxy(aof.port, aof.kill_and_restart)
    common: dict[str, Any] = dict(redis_url=proxy.url, registry_ttl_s=3600.0, shm_dir="", inline_max_bytes=0)
    clients = {
        "submit": Client(ClientSettings.from_env(**common, chunk_rows=4), listen=False),
        "submit_many": Client(ClientSettings.from_env(**common), listen=False),
        "lane": Client(ClientSettings.from_env(**{**common, "inline_max_bytes": 8192}, lane_max_rows=64), listen=False),
        "shm": Client(ClientSettings.from_env(**{**common, "shm_dir": str(folder)}, shm_min_bytes=0), listen=False),
    }
    register(clients["submit"], built.directory)
    rng = np.random.default_rng(16)

    def rows(n: int) -> np.ndarray:
        return np.ascontiguousarray(built.X[rng.integers(0, len(built.X), n)])

    def call(kind: str) -> list[tuple[Any, np.ndarray]]:
        if kind == "submit_many":
            xs = [rows(int(rng.integers(1, 5))) for _ in range(4)]
            return list(zip(clients[kind].submit_many("faults-iris", xs), xs, strict=True))
        x = rows(10 if kind == "submit" else 3)  # submit: 3 chunks of 4, 4, 2 rows
        if kind == "cold":
            client = Client(ClientSettings.from_env(**{**common, "registry_ttl_s": 0.0}), listen=False)
            try:
                return [(client.submit("faults-iris", x), x)]
            finally:
                client.close()
        return [(clients[kind].submit("faults-iris", x), x)]

    for kind in clients:  # warm the caches: later calls send their publishing round trips only
        call(kind)
    accepted: list[tuple[str, Any, np.ndarray]] = []
    outcomes: collections.Counter[str] = collections.Counter()
    untyped: list[str] = []
    steps: dict[str, int] = {}
    for kind in (*clients, "cold"):
        before = proxy.forwarded
        accepted += [(kind, *job) for job in call(kind)]
        steps[kind] = proxy.forwarded - before + 3  # a new connection's handshake commands too
    started = time.monotonic()
    while proxy.kills < MIN_KILLS:
        for kind, n in steps.items():
            for where, nth in [("before", 1)] + [("after", k) for k in range(1, n + 1)]:
                proxy.arm(where, nth)
                try:
                    jobs = call(kind)
                except BrokerError:
                    jobs = []
                except Exception as exc:  # anything else is a finding
                    untyped.append(f"{kind} {where} {nth}: {type(exc).__name__}: {exc}")
                    jobs = []
                if proxy.disarm():  # the kill happened during this call
                    outcomes[f"{kind}: {'accepted' if jobs else 'refused'}"] += 1
                accepted += [(kind, *job) for job in jobs]
    kill_s = time.monotonic() - started
    print(f"faults: {proxy.kills} kills in {kill_s:.0f} s, steps {steps}, {dict(outcomes)}")
    for client in clients.values():
        client.close()
    proxy.close()

    env = {**FAST_RECOVERY, "HETBATCH_SHM_DIR": str(folder), "CUDA_VISIBLE_DEVICES": ""}
    worker = WorkerProcess(aof.url, tmp_path, env=env)
    try:
        with Client(ClientSettings.from_env(redis_url=aof.url, shm_dir=""), listen=False) as reader:
            lost, wrong = _check(reader, accepted, built, deadline_s=120)
    finally:
        worker.stop()
    assert untyped == [], f"{len(untyped)} calls raised something else than BrokerError: {untyped[:10]}"
    assert lost == [], f"{len(lost)} of {len(accepted)} accepted jobs lost: {collections.Counter(lost)}"
    assert wrong == [], f"accepted jobs answered wrongly: {collections.Counter(wrong)}"
    assert proxy.kills >= MIN_KILLS


def _check(
    reader: Client, accepted: list[tuple[str, Any, np.ndarray]], built: Built, deadline_s: float
) -> tuple[list[str], list[str]]:
    """Kinds of the accepted jobs not answered within ``deadline_s`` overall, and of those answered wrongly."""
    lost: list[str] = []
    wrong: list[str] = []
    until = time.monotonic() + deadline_s
    for kind, job, x in accepted:
        try:
            attached = reader.job(job.id) if job.pack is None else job
            attached._client = reader  # a pack's job reads through the live client
            table = attached.result(timeout_s=max(1.0, until - time.monotonic()))
        except Exception as exc:
            lost.append(f"{kind}: {type(exc).__name__}")
            continue
        if not _equal(built, x, table):
            wrong.append(kind)
    return lost, wrong
