"""Real Flower (``hetbatch flower``, basic auth) watching a real worker run real jobs."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hetbatch.producers import Client
from hetbatch.producers.protocol.schema import to_table
from hetbatch.producers.protocol.wire import encode_table
from hetbatch.worker.devtools.redis_server import free_port
from tests.kit.helpers import ROOT, WorkerProcess, column, register
from tests.kit.models import Built, sklearn_model

USER, PASSWORD = "operator", "flower-test-pw"
WORKER = "flower-test@localhost"


@pytest.fixture(scope="module")
def worker(private_redis: str, work_dir: Path) -> Iterator[WorkerProcess]:
    proc = WorkerProcess(private_redis, work_dir, "--concurrency", "4", "--name", WORKER)
    yield proc
    proc.stop()


def start_flower(redis_url: str, log: Path, *args: str, **env: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    full_env = dict(os.environ, HETBATCH_REDIS_URL=redis_url, PYTHONUNBUFFERED="1", **env)
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "hetbatch", "flower", "--port", str(port), "--address", "127.0.0.1", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            if get(port, "/healthcheck", auth=None)[1] == b"OK":
                return proc, port
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"flower did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.3)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def flower(private_redis: str, work_dir: Path, worker: WorkerProcess) -> Iterator[int]:
    proc, port = start_flower(
        private_redis, work_dir / "flower.log", HETBATCH_FLOWER_USER=USER, HETBATCH_FLOWER_PASSWORD=PASSWORD
    )
    yield port
    stop(proc)


def get(port: int, path: str, auth: tuple[str, str] | None = (USER, PASSWORD)) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def poll(port: int, path: str, ready: Any, timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        code, body = get(port, path)
        data = json.loads(body) if code == 200 else None
        if data is not None and ready(data):
            return data
        if time.monotonic() > deadline:
            raise AssertionError(f"GET {path} never got ready; last answer {code}: {body[:500]!r}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def iris(work_dir: Path) -> Built:
    return sklearn_model(work_dir / "flower-iris", "flower-iris", "iris")


def test_flower_shows_the_worker_online_and_its_tasks_succeeded(private_redis: str, flower: int, iris: Built) -> None:
    poll(flower, "/api/workers?status=1", lambda d: d.get(WORKER) is True)
    with Client.from_url(private_redis) as client:
        ref = register(client, iris.directory)
        # Workers start with task events off; Flower turns them on by itself within seconds.
        deadline = time.monotonic() + 60
        while get(flower, "/api/tasks")[1].strip() in (b"{}", b""):
            assert time.monotonic() < deadline, "Flower never turned the workers' task events on"
            client.predict(ref, iris.X[:1], timeout_s=60)
            time.sleep(0.5)
        job = client.submit(ref, iris.X)  # 150 rows: small enough to travel inline, as base64
        pieces = [iris.X[i : i + 5] for i in range(0, 30, 5)]
        many = client.submit_many(ref, pieces, pack_rows=10)  # 3 tasks of 2 jobs each
        np.testing.assert_array_equal(column(job.result(timeout_s=120), "label"), iris.model.predict(iris.X))
        for j, piece in zip(many, pieces, strict=True):
            np.testing.assert_array_equal(column(j.result(timeout_s=120), "label"), iris.model.predict(piece))
        inline = base64.b64encode(encode_table(to_table(iris.X, client.spec(ref).inputs))).decode()

    tasks = poll(
        flower,
        "/api/tasks",
        lambda d: sum(t["state"] == "SUCCESS" for t in d.values()) >= 4,
    )
    # A task running while Flower turned events on is seen half (no name): judge the whole ones.
    assert all(t["worker"] == WORKER and t["name"] == "hetbatch.predict" for t in tasks.values() if t["name"])
    args = {t["args"] for t in tasks.values()}
    assert f"{ref} jobs=1 first={job.id} rows=150" in args
    assert sum(f"{ref} jobs=2 first={j.id} rows=10" in args for j in many[::2]) == 3
    listing = json.dumps(tasks)
    assert inline[:64] not in listing and "payload_b64" not in listing
    status, body = get(flower, f"/api/task/info/{next(iter(tasks))}")
    assert status == 200 and "payload" not in body.decode()


def test_flower_shows_lane_batches_as_tasks(private_redis: str, flower: int, iris: Built) -> None:
    with Client.from_url(private_redis, lane_max_rows=16) as client:
        ref = register(client, iris.directory)
        deadline, sent = time.monotonic() + 60, 5
        while get(flower, "/api/tasks")[1].strip() in (b"{}", b""):  # task events on (see above)
            assert time.monotonic() < deadline, "Flower never turned the workers' task events on"
            client.predict(ref, iris.X[:1], timeout_s=60)
            sent += 1
            time.sleep(0.5)
        jobs = [client.submit(ref, iris.X[i : i + 3]) for i in range(0, 15, 3)]
        for i, job in zip(range(0, 15, 3), jobs, strict=True):
            out = job.result(timeout_s=120)
            np.testing.assert_array_equal(column(out, "label"), iris.model.predict(iris.X[i : i + 3]))

    def lane_batches(tasks: dict[str, Any]) -> list[dict[str, Any]]:
        return [t for t in tasks.values() if t["name"] == "hetbatch.lane" and t["state"] == "SUCCESS"]

    # Each batch's args: "<n> jobs from <lane list>". A batch running while events were
    # turned on is seen half: at least the 5 jobs sent after that are counted.
    tasks = poll(flower, "/api/tasks", lambda d: sum(int(t["args"].split()[0]) for t in lane_batches(d)) >= 5)
    batches = lane_batches(tasks)
    assert sum(int(t["args"].split()[0]) for t in batches) <= sent
    assert all(t["worker"] == WORKER and t["args"].endswith("jobs from sklearn.cpu:lane") for t in batches)
    assert all(ref in t["result"] and "'failed': 0" in t["result"] for t in batches)


def test_flower_refuses_requests_without_the_right_credentials(flower: int) -> None:
    for path in ("/api/workers", "/api/tasks", "/", "/tasks"):
        assert get(flower, path, auth=None)[0] == 401, path
        assert get(flower, path, auth=(USER, "wrong"))[0] == 401, path
    assert get(flower, "/api/tasks")[0] == 200


def test_hetbatch_flower_refuses_to_start_without_credentials(private_redis: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HETBATCH_FLOWER_", "FLOWER_"))}
    done = subprocess.run(
        [sys.executable, "-m", "hetbatch", "--redis-url", private_redis, "flower", "--port", str(free_port())],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "HETBATCH_FLOWER_USER" in done.stderr and "--no-auth" in done.stderr


def test_no_auth_is_explicit_and_warns(private_redis: str, work_dir: Path) -> None:
    log = work_dir / "flower-noauth.log"
    proc, port = start_flower(private_redis, log, "--no-auth")
    try:
        assert "WITHOUT authentication" in log.read_text()
        assert get(port, "/", auth=None)[0] == 200
    finally:
        stop(proc)
