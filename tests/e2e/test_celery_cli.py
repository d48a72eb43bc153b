"""Celery's own command line (``celery inspect``, ``control``, ``events``) against a real worker.

Each command runs as a subprocess, as an operator would type it, on a private redis-server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from hetbatch import adapters
from hetbatch.producers import Client
from hetbatch.producers.protocol.shm import HOST_SEP, host_token
from hetbatch.worker.devtools.redis_server import RedisServer
from hetbatch.worker.settings import WorkerSettings
from tests.kit.faults import FaultyWorker
from tests.kit.helpers import ROOT, WorkerProcess, column, register
from tests.kit.models import Built, sklearn_model

APP = "hetbatch.worker.celery_app"
WORKER = "celery-cli@localhost"


def celery(url: str, *args: str, via: str = "-A", timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``celery -A hetbatch.worker.celery_app ARGS`` (or ``celery -b URL ARGS`` with ``via="-b"``)."""
    target = ["-A", APP] if via == "-A" else ["-b", url]
    env = dict(os.environ, HETBATCH_REDIS_URL=url, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.run(
        [sys.executable, "-m", "celery", *target, *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        cwd=ROOT,
        check=False,
    )


def replies(out: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The JSON replies of ``celery inspect|control ... --json``, by worker name (``inspect``
    prints one object, ``control`` a list of one-key objects)."""
    assert out.returncode == 0, f"celery exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
    parsed = json.loads(out.stdout)
    return {k: v for reply in parsed for k, v in reply.items()} if isinstance(parsed, list) else dict(parsed)


@pytest.fixture(scope="module")
def shm_dir(work_dir: Path) -> Path:
    folder = work_dir / "celery-cli-shm"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def slow_model(private_redis: str, work_dir: Path) -> tuple[Built, str]:
    """A model whose calls take 2 s (long enough for ``inspect active`` to find its task
    running), registered; returns it and its ``name@version``."""
    built = sklearn_model(work_dir / "celery-cli-slow", "celery-cli-slow", "iris", trees=5, options={"sleep_s": 2.0})
    # Registration checks the options with the adapter the worker will load: the faulty one.
    stock = adapters.ADAPTERS["sklearn"]
    adapters.ADAPTERS["sklearn"] = ("tests.kit.faults:FaultySklearnAdapter", "sklearn")
    try:
        with Client.from_url(private_redis) as client:
            return built, register(client, built.directory)
    finally:
        adapters.ADAPTERS["sklearn"] = stock


@pytest.fixture(scope="module")
def worker(private_redis: str, work_dir: Path, shm_dir: Path) -> Iterator[WorkerProcess]:
    proc = FaultyWorker(
        private_redis, work_dir, "--concurrency", "4", "--name", WORKER, env={"HETBATCH_SHM_DIR": str(shm_dir)}
    )
    yield proc
    proc.stop()


@pytest.mark.parametrize("via", ["-A", "-b"])
def test_inspect_ping_answers_within_two_seconds_with_the_worker_name(
    private_redis: str, worker: WorkerProcess, via: str
) -> None:
    started = time.monotonic()
    out = celery(private_redis, "inspect", "ping", "--timeout", "2", "--json", via=via)
    assert replies(out) == {WORKER: {"ok": "pong"}}
    assert time.monotonic() - started < 20, "celery waited far past its 2 s timeout"


def test_inspect_active_queues_lists_the_pool_and_host_queues(
    private_redis: str, worker: WorkerProcess, shm_dir: Path
) -> None:
    token = host_token(str(shm_dir))
    assert token is not None, "the worker made no host token"
    names = {q["name"] for q in replies(celery(private_redis, "inspect", "active_queues", "--json"))[WORKER]}
    assert names == set(WorkerSettings(shm_dir=str(shm_dir)).queue_names)
    assert any(name.endswith(f"{HOST_SEP}{token[:16]}") for name in names)


def test_inspect_registered_and_stats_name_the_hetbatch_tasks(private_redis: str, worker: WorkerProcess) -> None:
    registered = replies(celery(private_redis, "inspect", "registered", "--json"))[WORKER]
    assert {"hetbatch.predict", "hetbatch.fuse"} <= set(registered)
    stats = replies(celery(private_redis, "inspect", "stats", "--json"))[WORKER]
    assert stats["pid"] == worker.proc.pid


def test_inspect_active_shows_model_job_and_rows_never_the_payload(
    private_redis: str, worker: WorkerProcess, slow_model: tuple[Built, str]
) -> None:
    model, ref = slow_model
    with Client.from_url(private_redis) as client:
        rows = model.X[:7]
        job = client.submit("celery-cli-slow", rows, priority="high")  # high: a Celery task, not the lane
        deadline = time.monotonic() + 30
        active: list[dict[str, Any]] = []
        while not active and time.monotonic() < deadline:
            out = celery(private_redis, "inspect", "active", "--timeout", "1", "--json")
            active = replies(out)[WORKER]
        assert active, "the slow task never showed as active"
        assert active[0]["args"] == f"{ref} jobs=1 first={job.id} rows=7"
        assert active[0]["kwargs"] == {}
        assert "payload" not in out.stdout
        np.testing.assert_array_equal(column(job.result(timeout_s=60), "label"), model.model.predict(rows))


def test_events_dump_shows_task_events_once_enabled(
    private_redis: str, worker: WorkerProcess, slow_model: tuple[Built, str], work_dir: Path
) -> None:
    model, ref = slow_model
    enabled = replies(celery(private_redis, "control", "enable_events", "--json"))
    assert enabled == {WORKER: {"ok": "task events enabled"}}
    log = work_dir / "celery-events.log"
    env = dict(os.environ, HETBATCH_REDIS_URL=private_redis, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    with log.open("wb") as fh:
        dump = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", APP, "events", "--dump"],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 30
        while b" heartbeat: " not in log.read_bytes():  # the receiver is bound: task events reach it
            assert dump.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.2)
        with Client.from_url(private_redis) as client:
            job = client.submit("celery-cli-slow", model.X[:3], priority="high")
            out = job.result(timeout_s=60)
        np.testing.assert_array_equal(column(out, "label"), model.model.predict(model.X[:3]))
        deadline = time.monotonic() + 15
        while b"task succeeded" not in log.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.2)
        text = log.read_text(errors="replace")
        received = [line for line in text.splitlines() if "task received" in line and f"{job.id}.0" in line]
        assert received, text
        assert f"args={ref} jobs=1 first={job.id} rows=3" in received[0]
        assert any("task succeeded" in line for line in text.splitlines()), text
    finally:
        dump.terminate()
        dump.wait(timeout=15)
        replies(celery(private_redis, "control", "disable_events", "--json"))


def test_pool_restart_is_refused_and_control_shutdown_stops_the_named_worker(
    private_redis: str, work_dir: Path
) -> None:
    name = "celery-cli-shutdown@localhost"
    doomed = WorkerProcess(private_redis, work_dir, "--concurrency", "2", "--name", name)
    try:
        restart = replies(celery(private_redis, "control", "pool_restart", "--destination", name, "--json"))
        assert "Pool restarts not enabled" in restart[name]["error"]  # the threads pool cannot restart
        assert doomed.alive()
        out = celery(private_redis, "control", "shutdown", "--destination", name, "--timeout", "1")
        assert out.returncode in (0, 69), out.stderr  # 69: Celery's "no reply": a worker that stops sends none
        doomed.proc.wait(timeout=30)
        assert doomed.proc.returncode == 0
        assert "Got shutdown from remote" in doomed.output()
    finally:
        doomed.stop()


def test_only_a_user_allowed_the_pidbox_channel_can_send_remote_control(work_dir: Path) -> None:
    """SECURITY.md's split: producers get no pub/sub, workers publish only events, operators both."""
    from tests.e2e.test_security import ACL_COMMANDS

    every = [f"+{c}" for c in ACL_COMMANDS]
    pubsub = {"+publish", "+subscribe", "+psubscribe", "+unsubscribe", "+punsubscribe"}
    users = {
        "producer": ["~*", "resetchannels", "-@all", *(c for c in every if c not in pubsub)],
        "worker": ["~*", "resetchannels", "&/0.celery.pidbox", "-@all", *(c for c in every if c != "+publish")],
        "operator": ["~*", "resetchannels", "&/0.celery.pidbox", "&/0.celeryev/*", "-@all", *every],
    }
    users["worker"].append("(+publish resetchannels &/0.celeryev/*)")  # a selector: PUBLISH on events only
    server = RedisServer(
        "--requirepass", "admin-pw", *(a for u, rule in users.items() for a in ("--user", u, "on", f">{u}-pw", *rule))
    )
    url = {u: f"redis://{u}:{u}-pw@127.0.0.1:{server.port}/0" for u in users}
    name = "celery-cli-acl@localhost"
    worker = WorkerProcess(url["worker"], work_dir, "--concurrency", "2", "--name", name)
    try:
        refused = celery(url["producer"], "control", "shutdown", "--timeout", "1", via="-b")
        assert refused.returncode != 0 and "no permissions to run the 'publish' command" in refused.stderr
        pong = replies(celery(url["operator"], "inspect", "ping", "-t", "2", "--json", via="-b"))
        assert pong == {name: {"ok": "pong"}}
        assert worker.alive()
        admin = redis.Redis(host="127.0.0.1", port=server.port, password="admin-pw")
        assert {e["username"] for e in admin.acl_log()} == {"producer"}  # the worker needed nothing more
    finally:
        worker.stop()
        server.stop()
