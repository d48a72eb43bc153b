"""Big results back through shared memory, for a client and a worker sharing a folder.

A real worker and a client share a tmpfs folder; a job whose input came through a file
there gets its big results back in files of that folder, under file references
(``parts.file_ref``), and every result equals the model run in-process. The client reads
each file once and deletes it. A reference whose file is missing, cut short, grown, a
FIFO or a link fails its job with a typed error naming the job, never a hang and never
a read outside the folder.
"""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import torch

from hetbatch.producers import Client, JobFailed
from hetbatch.producers.aio import AsyncClient
from hetbatch.producers.errors import JobLost, PayloadError
from hetbatch.producers.protocol import parts, shm
from hetbatch.producers.protocol.keys import Keys
from hetbatch.producers.protocol.transport import Transport
from hetbatch.producers.protocol.wire import Item, Status, TaskEnvelope, encode_result
from hetbatch.worker.devtools.redis_server import RedisServer
from hetbatch.worker.results import Done, ResultWriter, outcomes_of
from tests.kit.helpers import WorkerProcess, column, register
from tests.kit.models_rows import wide_output

QUEUE = "torch.cpu"
WIDTH = 1024  # 4 KiB of outputs per row: 256 rows make the 1 MiB a result file needs


@pytest.fixture()
def tmp_path(shm_path: Path) -> Path:
    """This module's folders live on tmpfs (see ``shm_path`` in tests/conftest.py)."""
    return shm_path


@pytest.fixture(scope="module")
def model(work_dir: Path) -> tuple[Path, torch.jit.ScriptModule]:
    return wide_output(work_dir / "wide-shm", "wide-shm", WIDTH)


def _in_process(scripted: torch.jit.ScriptModule, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return np.asarray(scripted(torch.from_numpy(x)).numpy())


def _results(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("hetbatch-out-"))


def _host_client(url: str, folder: str, model: Path) -> Client:
    """A client sharing ``folder`` with a worker (its inputs of 1 KB or more go there),
    once the worker announced its host queue."""
    client = Client.from_url(url, shm_dir=folder, shm_min_bytes=1_000)
    register(client, model)
    deadline = time.monotonic() + 30
    while client.router.host_queue(QUEUE) is None:  # the worker's first heartbeat
        assert time.monotonic() < deadline, "no worker said it consumes its host queue"
        time.sleep(0.05)
    return client


@pytest.fixture()
def shm_worker(redis_server: RedisServer, work_dir: Path, tmp_path: Path) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(redis_server.url, work_dir, "--queues", QUEUE, env={"HETBATCH_SHM_DIR": str(tmp_path)})
    yield worker
    worker.stop()


def _wait_done(client: Client, job_id: str) -> None:
    job, deadline = client.job(job_id), time.monotonic() + 60
    while job.status() is not Status.DONE:
        assert time.monotonic() < deadline, f"job {job_id} did not finish"
        time.sleep(0.05)


def test_big_results_come_back_in_files_equal_to_in_process_and_go_once_read(
    redis_server: RedisServer,
    model: tuple[Path, torch.jit.ScriptModule],
    shm_worker: WorkerProcess,
    tmp_path: Path,
) -> None:
    directory, scripted = model
    X = np.random.default_rng(0).standard_normal((1_500, 1), dtype=np.float32)
    with _host_client(redis_server.url, str(tmp_path), directory) as client:
        job = client.submit("wide-shm", X, chunk_rows=500)  # 3 chunks of 2 MB of outputs
        small = client.submit("wide-shm", X[:100])  # 400 KB of outputs: through Redis
        _wait_done(client, job.id)
        _wait_done(client, small.id)
        stored = client.redis.mget([client.keys.result(job.id, c) for c in range(3)])
        assert all(parts.is_file_ref(v) for v in stored)  # answered: the ledger, status and reconciler see a key
        assert _results(tmp_path) == sorted(str(shm.result_name(job.id, c)) for c in range(3))
        assert not parts.is_file_ref(client.redis.get(client.keys.result(small.id, 0)))
        np.testing.assert_array_equal(column(job.result(timeout_s=60), "wide"), _in_process(scripted, X))
        np.testing.assert_array_equal(column(small.result(timeout_s=60), "wide"), _in_process(scripted, X[:100]))
        assert _results(tmp_path) == []  # each file went once read
        with pytest.raises(JobLost, match=f"job {job.id}.*gone.*read already"):
            client.job(job.id).result(timeout_s=10)

        async def read_async() -> np.ndarray:
            async with AsyncClient.from_url(redis_server.url, shm_dir=str(tmp_path), shm_min_bytes=1_000) as aio:
                got = await aio.submit("wide-shm", X[:600])
                return column(await got.result(timeout_s=60), "wide")

        np.testing.assert_array_equal(asyncio.run(read_async()), _in_process(scripted, X[:600]))
        assert _results(tmp_path) == []
        # A result file whose client never reads it goes with the job's deletion.
        unread = client.submit("wide-shm", X[:600])
        _wait_done(client, unread.id)
        assert _results(tmp_path) == [shm.result_name(unread.id, 0)]
        unread.delete()
        assert _results(tmp_path) == []
    assert shm_worker.alive()


def _stored_job(client: Client, value: bytes, chunks: int = 1) -> str:
    """A job whose one chunk's stored result is ``value`` (as a hostile writer could leave)."""
    job_id = os.urandom(16).hex()
    client.redis.set(client.keys.job(job_id), json.dumps({"model": "wide-shm@1", "chunks": chunks, "rows": 1}))
    client.redis.set(client.keys.result(job_id, 0), value)
    return job_id


def test_a_hostile_file_reference_fails_its_job_with_a_typed_error(redis_server: RedisServer, tmp_path: Path) -> None:
    folder = str(tmp_path)
    with Client.from_url(redis_server.url, shm_dir=folder) as client:

        def read(job_id: str) -> object:
            return client.job(job_id).result(timeout_s=10)

        missing = _stored_job(client, parts.file_ref(100))
        with pytest.raises(JobLost, match=f"job {missing}"):
            read(missing)
        huge = _stored_job(client, parts.file_ref(parts.MAX_FILE_BYTES))  # 64 GiB: allocated by the file's size
        (tmp_path / str(shm.result_name(huge, 0))).write_bytes(b"x" * 10)
        with pytest.raises(PayloadError, match=f"job {huge}.*has 10 bytes"):
            read(huge)
        for got in (99, 101):  # cut short, grown: the stored size is the check
            job_id = _stored_job(client, parts.file_ref(100))
            (tmp_path / str(shm.result_name(job_id, 0))).write_bytes(b"x" * got)
            with pytest.raises(PayloadError, match=f"job {job_id}"):
                read(job_id)
        fifo = _stored_job(client, parts.file_ref(100))
        os.mkfifo(tmp_path / str(shm.result_name(fifo, 0)))
        with pytest.raises(PayloadError, match=f"job {fifo}.*not a regular file"):
            read(fifo)  # never blocks on the FIFO
        link = _stored_job(client, parts.file_ref(5))
        os.symlink("/etc/hostname", tmp_path / str(shm.result_name(link, 0)))
        with pytest.raises(PayloadError, match=f"job {link}.*cannot open"):
            read(link)  # never followed out of the folder
        for corrupt in (b"F", b"F{", b'F{"bytes": true}', b'F{"bytes": -1}', b'F{"bytes": 1e400}', b"F" + b" " * 100):
            job_id = _stored_job(client, corrupt)
            with pytest.raises(JobFailed, match="not a file reference"):
                read(job_id)
        # An id that names no file (it is not a client's): refused before any path is made.
        odd = "../" + "a" * 32
        client.redis.set(client.keys.job(odd), json.dumps({"model": "wide-shm@1", "chunks": 1, "rows": 1}))
        client.redis.set(client.keys.result(odd, 0), parts.file_ref(5))
        with pytest.raises(PayloadError, match="cannot name a shared-memory result file"):
            read(odd)
    name = str(shm.result_name("ab" * 16, 0))
    (tmp_path / name).write_bytes(b"x")
    with pytest.raises(PayloadError, match="not a shared-memory payload name"):  # a worker never reads one as input
        shm.read_payload(folder, name, "job-1", 1024)
    with Client.from_url(redis_server.url, shm_dir="") as elsewhere:  # no folder here
        job_id = _stored_job(elsewhere, parts.file_ref(100))
        with pytest.raises(PayloadError, match="has none"):
            elsewhere.job(job_id).result(timeout_s=10)


def _env(job_id: str, rows: int) -> TaskEnvelope:
    return TaskEnvelope(
        model="wide-shm", version="1", items=(Item(job_id, 0, rows),), payload_shm=shm.payload_name(job_id, 0)
    )


def test_a_second_execution_never_replaces_a_result_file_and_leaves_none_behind(
    redis_server: RedisServer, model: tuple[Path, torch.jit.ScriptModule], tmp_path: Path
) -> None:
    import pyarrow as pa

    _, scripted = model
    keys, folder = Keys(), str(tmp_path)
    client = redis.Redis.from_url(redis_server.url)
    writer = ResultWriter(client, keys, ttl_s=60, inline_bytes=0, transport=Transport(keys, folder))
    X = np.random.default_rng(1).standard_normal((300, 1), dtype=np.float32)
    out = _in_process(scripted, X)
    table = pa.table({"wide": pa.FixedSizeListArray.from_arrays(pa.array(out.ravel()), WIDTH)})
    job_id = os.urandom(16).hex()
    env = _env(job_id, len(X))
    assert writer.write(outcomes_of(env, [Done(0, list(env.items), table)], 1 << 30, writer.place), None) == 1
    name = str(shm.result_name(job_id, 0))
    first = (tmp_path / name).read_bytes()
    assert first == bytes(encode_result(table))  # written from the rows: the very bytes an encoding gives
    # Another execution while the file waits for its reader: it stores nothing, and the file stays.
    assert writer.write(outcomes_of(env, [Done(0, list(env.items), table)], 1 << 30, writer.place), None) == 0
    assert (tmp_path / name).read_bytes() == first
    stored = client.get(keys.result(job_id, 0))
    assert parts.read_file_ref(job_id, 0, stored) == len(first)
    got = Transport(keys, folder).read_results(job_id, job_id, {0: stored})
    assert bytes(got[0]) == first and _results(tmp_path) == []
    assert isinstance(memoryview(got[0]).obj, mmap.mmap)  # mapped, not copied (README: shared memory)
    # One after the read: its file would have no reader, so it goes.
    assert writer.write(outcomes_of(env, [Done(0, list(env.items), table)], 1 << 30, writer.place), None) == 0
    assert _results(tmp_path) == []
    # Old result files nobody read are swept with old input files.
    (tmp_path / name).write_bytes(b"x")
    os.utime(tmp_path / name, (time.time() - 7200, time.time() - 7200))
    assert shm.sweep(folder, 3600) == 1 and _results(tmp_path) == []
