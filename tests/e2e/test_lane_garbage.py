"""Garbage on a lane is dead-lettered raw and never stops the lane or the worker."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from hetbatch.producers import Client
from hetbatch.producers.protocol.keys import Keys, lane_list
from hetbatch.worker.ops.dlq import RAW_KEEP_BYTES, DeadLetters
from tests.kit.helpers import WorkerProcess, column, register
from tests.kit.models import Built, sklearn_model

GARBAGE = [
    b"garbage",
    b"",
    b"\xff\xfe not utf-8",
    b"[1,2]",
    b'{"x":1}',
    b"null",
    b"[" * 100_000,  # nested past the JSON decoder's depth
    json.dumps({"v": 1, "model": "m", "version": "1", "items": "not a list", "payload_b64": ""}).encode(),
    json.dumps({"v": 1, "model": ["m"], "version": 1, "items": [["j", "x", None]], "payload_b64": 5}).encode(),
    b"x" * (3 << 20),  # over the size limit set below
]


@pytest.fixture()
def lane_worker(private_redis: str, tmp_path: Path) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(private_redis, tmp_path, env={"HETBATCH_MAX_PAYLOAD_BYTES": str(2 << 20)})
    yield worker
    worker.stop()


def test_garbage_on_a_lane_is_dead_lettered_raw_and_the_lane_goes_on(
    private_redis: str, lane_worker: WorkerProcess, tmp_path: Path
) -> None:
    built: Built = sklearn_model(tmp_path / "iris", "garbage-iris", "iris")
    r = redis.Redis.from_url(private_redis)
    r.delete(Keys().dlq())
    with Client.from_url(private_redis, lane_max_rows=16) as client:
        register(client, built.directory)
        client.predict("garbage-iris", built.X[:2], timeout_s=120)  # the lane is up and the model loaded
        r.lpush(lane_list("sklearn.cpu"), *GARBAGE)
        for _ in range(3):  # the lane keeps answering, batch after batch
            x = built.X[:5]
            np.testing.assert_array_equal(column(client.predict("garbage-iris", x, timeout_s=60), "label"),
                                          built.model.predict(x))  # fmt: skip
    assert lane_worker.alive(), lane_worker.output()[-3000:]
    letters = [e for e in DeadLetters(r, Keys()).entries() if e.task_id.startswith("raw-")]
    assert len(letters) == len(GARBAGE), [e.reason for e in letters]
    assert all(e.queue == lane_list("sklearn.cpu") and "not a task envelope" in e.reason for e in letters)
    kept = [r.hget(Keys().task(e.task_id), "raw") or b"" for e in letters]
    assert sorted(kept) == sorted(g[:RAW_KEEP_BYTES] for g in GARBAGE)
    assert "lane: taking a batch failed" not in lane_worker.output()  # the loop itself never failed
