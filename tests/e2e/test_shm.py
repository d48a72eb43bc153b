"""Big payloads through shared memory, for a producer and workers on one host.

Real Redis (private servers), real worker processes, real models; every result is
compared with the model's in-process predictions. Each test uses a folder of its own
as the shared-memory folder, so it sees only its own files.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from hetbatch.producers import Client, JobFailed
from hetbatch.producers.errors import JobLost, PayloadError
from hetbatch.producers.protocol import shm
from hetbatch.producers.protocol.keys import Keys
from hetbatch.producers.protocol.kombu import celery_message, priority_list
from hetbatch.producers.protocol.wire import FUSION_QUEUE
from hetbatch.worker.devtools.redis_server import RedisServer
from hetbatch.worker.settings import WorkerSettings
from tests.kit.faults import FaultyWorker
from tests.kit.helpers import FAST_RECOVERY, WorkerProcess, column, register
from tests.kit.models import Built, sklearn_model


@pytest.fixture()
def tmp_path(shm_path: Path) -> Path:
    """This module's folders live on tmpfs (see ``shm_path`` in tests/conftest.py)."""
    return shm_path


QUEUE = "sklearn.cpu"


@pytest.fixture(scope="module")
def digits(work_dir: Path) -> Built:
    return sklearn_model(work_dir / "shm-digits", "shm-digits", "digits")


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("hetbatch-in-"))


def _inputs(client: Client) -> list[bytes]:
    """Input payloads stored in Redis."""
    return list(client.redis.scan_iter(match=client.keys.input("*", "*")))


def _host_client(url: str, folder: str, model: Path) -> tuple[Client, str]:
    """A client sharing ``folder`` with a worker, once the worker announced its host queue."""
    client = Client.from_url(url, shm_dir=folder, shm_min_bytes=10_000)
    register(client, model)
    deadline = time.monotonic() + 30
    while (host := client.router.host_queue(QUEUE)) is None:  # the worker's first heartbeat
        assert time.monotonic() < deadline, "no worker said it consumes its host queue"
        time.sleep(0.05)
    return client, host


def test_payload_files_refuse_hostile_names_links_and_oversize(tmp_path: Path) -> None:
    good = shm.payload_name("ab" * 16, 3)
    shm.write_payload(str(tmp_path), good, b"arrow bytes")
    assert shm.read_payload(str(tmp_path), good, "job-1", 1024) == b"arrow bytes"
    for hostile in ("../../etc/passwd", "hetbatch-in-../x", "/etc/passwd", "hetbatch-host", ""):
        with pytest.raises(PayloadError, match="not a shared-memory payload name"):
            shm.read_payload(str(tmp_path), hostile, "job-1", 1024)
    with pytest.raises(PayloadError, match="over the limit"):
        shm.read_payload(str(tmp_path), good, "job-1", 4)
    link = shm.payload_name("cd" * 16, 0)
    os.symlink("/etc/hostname", tmp_path / link)
    with pytest.raises(PayloadError, match="cannot open"):
        shm.read_payload(str(tmp_path), link, "job-2", 1024)
    with pytest.raises(JobLost, match="gone"):
        shm.read_payload(str(tmp_path), shm.payload_name("ef" * 16, 0), "job-3", 1024)
    with pytest.raises(PayloadError, match="has none"):  # never a path relative to the worker's folder
        shm.read_payload("", good, "job-4", 1024)


def test_a_payload_file_cut_short_or_empty_reads_as_what_is_there_and_fails_to_decode(tmp_path: Path) -> None:
    """The read goes into a numpy buffer of the size found at open; a file cut before or
    while it is read gives its bytes so far, which the guarded decoder refuses."""
    import pyarrow as pa

    from hetbatch.producers.protocol.wire import decode_table, encode_table

    whole = bytes(encode_table(pa.table({"x": np.arange(10_000, dtype=np.float32)})))
    name = shm.payload_name("ab" * 16, 0)
    shm.write_payload(str(tmp_path), name, whole)
    read = shm.read_payload(str(tmp_path), name, "job-1", 1 << 20)
    assert bytes(read) == whole and isinstance(read.obj, np.ndarray)  # numpy memory: huge pages
    for cut in (whole[: len(whole) // 2], b""):
        shm.write_payload(str(tmp_path), name, cut)
        got = shm.read_payload(str(tmp_path), name, "job-1", 1 << 20)
        assert bytes(got) == cut
        with pytest.raises(PayloadError):
            decode_table(got)


def test_the_sweep_deletes_old_payload_files_only(tmp_path: Path) -> None:
    old, new = shm.payload_name("0" * 32, 0), shm.payload_name("1" * 32, 0)
    for name in (old, new, "unrelated"):
        (tmp_path / name).write_bytes(b"x")
    os.utime(tmp_path / old, (time.time() - 7200, time.time() - 7200))
    os.utime(tmp_path / "unrelated", (time.time() - 7200, time.time() - 7200))
    assert shm.sweep(str(tmp_path), 3600) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([new, "unrelated"])


def test_a_worker_consumes_its_queues_host_queues(tmp_path: Path) -> None:
    names = WorkerSettings(shm_dir=str(tmp_path)).queue_names
    token = shm.host_token(str(tmp_path))
    assert token is not None and token == shm.host_token(str(tmp_path), create=True)
    assert shm.host_queue(QUEUE, token) in names
    assert shm.host_queue(FUSION_QUEUE, token) not in names  # fusion steps carry no payload
    assert all(shm.HOST_SEP not in q for q in WorkerSettings(shm_dir="").queue_names)
    assert shm.host_token(str(tmp_path / "missing"), create=True) is None


@pytest.fixture()
def shm_worker(redis_server: RedisServer, work_dir: Path, tmp_path: Path) -> Iterator[WorkerProcess]:
    """A real worker whose shared-memory folder is the test's own ``tmp_path``."""
    worker = WorkerProcess(redis_server.url, work_dir, env={"HETBATCH_SHM_DIR": str(tmp_path)})
    yield worker
    worker.stop()


def test_a_big_job_goes_through_shared_memory_and_matches_in_process(
    redis_server: RedisServer, digits: Built, shm_worker: WorkerProcess, tmp_path: Path
) -> None:
    folder = str(tmp_path)
    client, host = _host_client(redis_server.url, folder, digits.directory)
    with client:
        assert host == shm.host_queue(QUEUE, str(shm.host_token(folder)))
        X = np.concatenate([digits.X] * 3)  # 5,391 rows x 64 float64: 2.8 MB
        job = client.submit("shm-digits", X, chunk_rows=1000)
        small = client.submit("shm-digits", digits.X[:5])  # under shm_min_bytes: through Redis
        tasks = [f"{job.id}.{c}" for c in range(6)] + [f"{small.id}.0"]
        queues = [client.redis.hget(Keys().task(t), "queue") for t in tasks]
        assert queues == [host.encode()] * 6 + [QUEUE.encode()]
        out = job.result(timeout_s=60)
        np.testing.assert_array_equal(column(out, "label"), digits.model.predict(X))
        np.testing.assert_allclose(column(out, "probabilities"), digits.model.predict_proba(X), atol=1e-6)
        np.testing.assert_array_equal(column(small.result(timeout_s=60), "label"), digits.model.predict(X[:5]))
        assert _files(tmp_path) == []  # each file went when its chunk's result was stored
        assert not _inputs(client)
        # A client that does not share the folder sends the same job through Redis.
        with Client.from_url(redis_server.url, shm_dir=str(tmp_path / "elsewhere")) as other:
            again = other.submit("shm-digits", X, chunk_rows=1000)
            np.testing.assert_array_equal(column(again.result(timeout_s=60), "label"), digits.model.predict(X))
    shm_worker.stop()
    assert shm_worker.proc.returncode == 0


def test_a_hostile_or_missing_payload_file_fails_its_job_alone(
    redis_server: RedisServer, digits: Built, shm_worker: WorkerProcess, tmp_path: Path
) -> None:
    folder = str(tmp_path)
    client, host = _host_client(redis_server.url, folder, digits.directory)
    with client:
        # A producer that names a file outside the folder, or one that is gone.
        for job_id, name in (("a" * 32, "../../../etc/passwd"), ("b" * 32, shm.payload_name("b" * 32, 0))):
            env = {"v": 1, "model": "shm-digits", "version": "1", "items": [[job_id, 0, 10]],
                   "payload_shm": name, "reply_to": None}  # fmt: skip
            client.ledger.record(client.redis, _parse(env), host, 3600)
            client.redis.lpush(priority_list(host, 5), celery_message("hetbatch.predict", [env], host, 5, "x"))
            client.redis.set(client.keys.job(job_id), json.dumps({"model": "shm-digits@1", "chunks": 1, "rows": 10}))
        good = client.submit("shm-digits", digits.X[:100])
        np.testing.assert_array_equal(column(good.result(timeout_s=60), "label"), digits.model.predict(digits.X[:100]))
        with pytest.raises(JobFailed, match="not a shared-memory payload name"):
            client.job("a" * 32).result(timeout_s=60)
        with pytest.raises(JobFailed, match="gone"):
            client.job("b" * 32).result(timeout_s=60)
        assert shm_worker.alive()


def _parse(env: dict[str, object]) -> object:
    from hetbatch.producers.protocol.wire import TaskEnvelope

    return TaskEnvelope.from_dict(env)


def test_a_sigkilled_worker_loses_no_shared_memory_job(
    redis_server: RedisServer, work_dir: Path, tmp_path: Path
) -> None:
    folder = str(tmp_path)
    slow = sklearn_model(work_dir / "shm-slow", "shm-slow", "digits", options={"sleep_s": 2.0})
    env = {**FAST_RECOVERY, "HETBATCH_SHM_DIR": folder}
    first, second = FaultyWorker(redis_server.url, work_dir, env=env), None
    try:
        client, _ = _host_client(redis_server.url, folder, slow.directory)
        with client:
            job = client.submit("shm-slow", slow.X, chunk_rows=600)
            assert len(_files(tmp_path)) == 3
            deadline = time.monotonic() + 60
            while not job.attempts():
                assert time.monotonic() < deadline, "the job did not start"
                time.sleep(0.1)
            first.kill()
            assert len(_files(tmp_path)) == 3  # inputs stay until their results are stored
            second = FaultyWorker(redis_server.url, work_dir, env=env)
            out = job.result(timeout_s=120)
            np.testing.assert_array_equal(column(out, "label"), slow.model.predict(slow.X))
            assert max(a.number for a in job.attempts()) == 2
            assert _files(tmp_path) == []
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_purge_drops_host_queue_tasks_and_their_files(redis_server: RedisServer, digits: Built, tmp_path: Path) -> None:
    folder = str(tmp_path)
    token = shm.host_token(folder, create=True)
    assert token is not None
    with Client.from_url(redis_server.url, shm_dir=folder, shm_min_bytes=10_000) as client:
        register(client, digits.directory)
        client.redis.set(Keys().alive(shm.host_queue(QUEUE, token)), "test", px=60_000)  # as a worker's heartbeat
        client.submit("shm-digits", digits.X, chunk_rows=500)
        assert len(_files(tmp_path)) == 4
        report = client.purge("shm-digits")
        assert report.messages == 4 and report.jobs == 1
        assert _files(tmp_path) == []
        assert client.redis.llen(priority_list(shm.host_queue(QUEUE, token), 5)) == 0
        job = client.submit("shm-digits", digits.X, chunk_rows=500)
        assert len(_files(tmp_path)) == 4
        job.delete()  # its inputs go with it
        assert _files(tmp_path) == []
