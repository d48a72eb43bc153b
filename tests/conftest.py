"""Fixtures: a private real Redis per session, real worker processes, real models."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from hetbatch.producers import Client
from hetbatch.worker.devtools.redis_server import RedisServer
from tests.kit.helpers import WorkerProcess


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A private redis-server, so tests never touch a shared Redis or each other."""
    url = os.environ.get("HETBATCH_TEST_REDIS_URL")
    if url:
        yield url
        return
    server = RedisServer()
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def private_redis() -> Iterator[str]:
    """A redis-server of the test module's own, for tests that count or restart things."""
    server = RedisServer()
    yield server.url
    server.stop()


@pytest.fixture()
def redis_server() -> Iterator[RedisServer]:
    """A redis-server of the test's own, for tests that kill workers or Redis."""
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hetbatch")


@pytest.fixture(scope="session")
def cpu_worker(redis_url: str, work_dir: Path) -> Iterator[WorkerProcess]:
    """One real CPU worker for the session (threads pool, all cpu queues)."""
    proc = WorkerProcess(redis_url, work_dir)
    yield proc
    proc.stop()


@pytest.fixture()
def client(redis_url: str) -> Iterator[Client]:
    c = Client.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture(scope="session", autouse=True)
def _faulty_options_register() -> Iterator[None]:
    """Some tests register models with the fault options of ``tests.kit.faults``
    (``sleep_s``, ``crash_on``) for the ``FaultyWorker`` that runs them."""
    from tests.kit.faults import faulty_options

    with faulty_options():
        yield


@pytest.fixture()
def shm_path() -> Iterator[Path]:
    """A folder on tmpfs (``/dev/shm`` where there is one), for tests of shared-memory inputs:
    a producer refuses a folder over three quarters full, which a test folder on a busy disk can be."""
    import shutil
    import tempfile

    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    folder = Path(tempfile.mkdtemp(prefix="hetbatch-test-", dir=base))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)
