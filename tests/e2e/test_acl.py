"""The ACL user SECURITY.md lists runs every part of hetbatch, and refused logins say so in one line.

The user is created from the ``ACL SETUSER`` block of SECURITY.md itself (so the doc
cannot drift from what is tested) on a private redis-server whose default user has a
password. Under that user: a worker, a client job (equal to the model in-process),
the lane, ``hetbatch status``, ``reconcile --once`` and ``dlq list``; Redis's ACL LOG
must show no refused command. With a wrong password or no Redis, the commands and a
worker print one line, no traceback, and exit non-zero.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from hetbatch.producers import Client
from hetbatch.worker.devtools.redis_server import RedisServer, free_port
from tests.kit.helpers import ROOT, WorkerProcess, column, register
from tests.kit.models import sklearn_model

ADMIN_PASSWORD = "acl-admin-s3cret"
USER, PASSWORD = "hetbatch", "acl-user-s3cret"
FAST = {"HETBATCH_VISIBILITY_TIMEOUT_S": "8", "HETBATCH_LEASE_INTERVAL_S": "1", "HETBATCH_RECONCILE_INTERVAL_S": "1"}


def documented_rule() -> list[str]:
    """The arguments of SECURITY.md's ``ACL SETUSER hetbatch ...`` block, its password filled in."""
    text = (ROOT / "SECURITY.md").read_text()
    block = re.search(r"```\n(ACL SETUSER hetbatch .*?)```", text, re.S)
    assert block is not None, "SECURITY.md lost its ACL SETUSER block"
    words = block.group(1).split()[2:]  # after "ACL SETUSER"
    return [f">{PASSWORD}" if w == ">PASSWORD" else w for w in words]


@pytest.fixture(scope="module")
def acl_redis() -> Iterator[tuple[RedisServer, str]]:
    server = RedisServer("--requirepass", ADMIN_PASSWORD)
    admin = redis.Redis(port=server.port, password=ADMIN_PASSWORD)
    admin.execute_command("ACL", "SETUSER", *documented_rule())
    admin.close()
    yield server, f"redis://{USER}:{PASSWORD}@127.0.0.1:{server.port}/0"
    server.stop()


def hetbatch(
    url: str, *args: str, env: dict[str, str] | None = None, timeout_s: float = 120
) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "hetbatch", "--redis-url", url, *args],
        capture_output=True, text=True, env=full, cwd=ROOT, timeout=timeout_s,
    )  # fmt: skip


def test_the_documented_acl_user_runs_worker_client_status_reconcile_and_dlq(
    acl_redis: tuple[RedisServer, str], tmp_path: Path
) -> None:
    server, url = acl_redis
    admin = redis.Redis(port=server.port, password=ADMIN_PASSWORD)
    admin.acl_log_reset()
    built = sklearn_model(tmp_path / "iris", "acl-doc-iris", "iris")
    worker = WorkerProcess(url, tmp_path, env=FAST)
    try:
        with Client.from_url(url) as client:
            register(client, built.directory)
            out = client.predict("acl-doc-iris", built.X, timeout_s=120)
            np.testing.assert_array_equal(column(out, "label"), built.model.predict(built.X))
        with Client.from_url(url, shm_dir="") as client:  # a payload big enough to travel as a Redis key
            x = np.tile(built.X, (40, 1))
            out = client.predict("acl-doc-iris", x, timeout_s=120)
            np.testing.assert_array_equal(column(out, "label"), built.model.predict(x))
        with Client.from_url(url, lane_max_rows=16) as lane:
            out = lane.predict("acl-doc-iris", built.X[:4], timeout_s=120)
            np.testing.assert_array_equal(column(out, "label"), built.model.predict(built.X[:4]))
        time.sleep(2)  # a heartbeat, a lease renewal and a reconciler sweep ran as the user
        for args in (["status"], ["status", "--json"], ["reconcile", "--once", "--overdue-s", "0"], ["dlq", "list"]):
            done = hetbatch(url, *args)
            assert done.returncode == 0, (args, done.stderr)
            assert "Traceback" not in done.stderr, done.stderr
        assert worker.alive(), worker.output()
    finally:
        worker.stop()
    denied = [e for e in admin.acl_log() if e.get("username") == USER]
    assert not denied, f"commands SECURITY.md's ACL lacks: {sorted({str(e.get('object')) for e in denied})}"
    assert "Traceback" not in worker.output(), worker.output()[-3000:]


def _one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("hetbatch:")]
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_a_wrong_password_or_no_redis_is_one_line_for_status_reconcile_and_dlq(
    acl_redis: tuple[RedisServer, str],
) -> None:
    server, _url = acl_redis
    wrong = f"redis://{USER}:wrong@127.0.0.1:{server.port}/0"
    nobody = f"redis://127.0.0.1:{free_port()}/0"
    for args in (["status"], ["reconcile", "--once"], ["dlq", "list"]):
        line = _one_line(hetbatch(wrong, *args))
        assert "refused the login" in line and "wrong" not in line, line  # the password is not shown
        line = _one_line(hetbatch(nobody, *args))
        assert "cannot reach Redis" in line, line


def test_a_worker_that_cannot_log_in_exits_with_one_line_after_a_few_tries(acl_redis: tuple[RedisServer, str]) -> None:
    server, _url = acl_redis
    wrong = f"redis://{USER}:wrong@127.0.0.1:{server.port}/0"
    started = time.monotonic()
    done = hetbatch(wrong, "worker", env={"HETBATCH_REDIS_LOGIN_TRIES": "2"}, timeout_s=60)
    assert time.monotonic() - started < 45
    line = _one_line(done)
    assert "refused the login" in line, line
