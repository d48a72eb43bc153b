"""A worker whose runtime cannot be built after Celery connected (here: its metrics
endpoint asked for an address this host does not have) exits with one clear line and
status ``STARTUP_FAILED_EXIT`` instead of consuming jobs and failing every one.
A real ``hetbatch worker`` process on a private redis-server."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from hetbatch.worker.devtools.redis_server import RedisServer
from hetbatch.worker.process import STARTUP_FAILED_EXIT
from tests.kit.helpers import ROOT


def test_a_worker_that_cannot_build_its_runtime_exits_with_one_line(redis_server: RedisServer) -> None:
    env = dict(
        os.environ,
        HETBATCH_REDIS_URL=redis_server.url,
        HETBATCH_METRICS_PORT="19999",
        HETBATCH_METRICS_ADDRESS="192.0.2.1",  # TEST-NET-1: on no interface here
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "hetbatch", "worker", "--loglevel", "INFO"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=40,
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == STARTUP_FAILED_EXIT, out[-3000:]
    assert time.monotonic() - started < 30
    lines = [line for line in out.splitlines() if "worker cannot start" in line]
    assert len(lines) == 1 and "Cannot assign requested address" in lines[0], out[-3000:]
    assert "Traceback" not in out, out[-3000:]
