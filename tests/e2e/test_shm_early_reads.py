"""Result files are read as they come, while a job's other chunks still run (issue 17,
bench (c)): a client that times out keeps what it read, and reads nothing twice."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import numpy as np
import pyarrow as pa
import pytest
import redis

from hetbatch.producers import Client, JobTimeout
from hetbatch.producers.errors import JobLost
from hetbatch.producers.protocol import parts, shm
from hetbatch.producers.protocol.keys import Keys
from hetbatch.producers.protocol.transport import Transport
from hetbatch.producers.protocol.wire import Item, TaskEnvelope
from hetbatch.worker.devtools.redis_server import RedisServer
from hetbatch.worker.results import Done, ResultWriter, outcomes_of
from tests.kit.helpers import column

WIDTH = 1024  # 4 KiB per row: 300 rows make a result over the 1 MiB a file needs
ROWS = 300


@pytest.fixture()
def folder(shm_path: Path) -> Iterator[Path]:
    yield shm_path


def _out_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("hetbatch-out-"))


def _store(writer: ResultWriter, job_id: str, chunk: int, out: np.ndarray) -> None:
    """Store ``out`` as chunk ``chunk``'s result, as a worker does for an input that came in a file."""
    env = TaskEnvelope(
        model="wide", version="1", items=(Item(job_id, chunk, len(out)),), payload_shm=shm.payload_name(job_id, chunk)
    )
    table = pa.table({"wide": pa.FixedSizeListArray.from_arrays(pa.array(out.ravel()), WIDTH)})
    assert writer.write(outcomes_of(env, [Done(0, list(env.items), table)], 1 << 30, writer.place), None) == 1


def test_files_read_before_a_timeout_are_kept_and_the_result_is_exact(redis_server: RedisServer, folder: Path) -> None:
    keys = Keys()
    conn = redis.Redis.from_url(redis_server.url)
    writer = ResultWriter(conn, keys, ttl_s=60, inline_bytes=0, transport=Transport(keys, str(folder)))
    outs = [np.random.default_rng(c).standard_normal((ROWS, WIDTH), dtype=np.float32) for c in range(3)]
    job_id = os.urandom(16).hex()
    conn.set(keys.job(job_id), json.dumps({"model": "wide@1", "chunks": 3, "rows": 3 * ROWS}))
    _store(writer, job_id, 0, outs[0])
    _store(writer, job_id, 1, outs[1])
    with Client.from_url(redis_server.url, shm_dir=str(folder)) as client:
        job = client.job(job_id)
        with pytest.raises(JobTimeout, match="2/3 chunks"):
            job.result(timeout_s=0.3)
        assert _out_files(folder) == []  # both read (and deleted) while chunk 2 was missing
        stored = cast(list[bytes | None], conn.mget([keys.result(job_id, c) for c in (0, 1)]))
        assert all(parts.is_file_ref(v) for v in stored)
        _store(writer, job_id, 2, outs[2])
        got = column(job.result(timeout_s=10), "wide")  # chunks 0 and 1 from what was read, not JobLost
        assert got.tobytes() == np.concatenate(outs).tobytes()  # bitwise
        assert _out_files(folder) == []
        # Read once: the bytes went to that result; another read finds the files gone.
        with pytest.raises(JobLost, match="gone"):
            client.job(job_id).result(timeout_s=10)
        # Deleting a job drops what was read of it early.
        other = os.urandom(16).hex()
        conn.set(keys.job(other), json.dumps({"model": "wide@1", "chunks": 2, "rows": 2 * ROWS}))
        _store(writer, other, 0, outs[0])
        with pytest.raises(JobTimeout):
            client.job(other).result(timeout_s=0.3)
        client.job(other).delete()
        assert _out_files(folder) == []
