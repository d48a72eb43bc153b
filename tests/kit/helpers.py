"""Shared test helpers: real worker processes and tiny real models written to disk."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hetbatch.producers import Client
from hetbatch.worker.modelops.registration import build_spec

ROOT = Path(__file__).resolve().parents[2]


# Recovery knobs lowered so that tests wait seconds, not minutes (visibility timeout 8 s).
FAST_RECOVERY = {
    "HETBATCH_VISIBILITY_TIMEOUT_S": "8",
    "HETBATCH_LEASE_INTERVAL_S": "1",
    "HETBATCH_RESTORE_INTERVAL_S": "1",
    "HETBATCH_OVERDUE_S": "3",
    "HETBATCH_RECONCILE_INTERVAL_S": "1",
}


class WorkerProcess:
    """A real ``hetbatch worker`` subprocess, stopped by pid."""

    def __init__(self, redis_url: str, log_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.log = log_dir / f"worker-{time.monotonic_ns()}.log"
        full_env = dict(os.environ, HETBATCH_REDIS_URL=redis_url, PYTHONUNBUFFERED="1", **(env or {}))
        full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
        self._fh = open(self.log, "wb")  # noqa: SIM115  # closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hetbatch", "worker", "--loglevel", "INFO", *args],
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=ROOT,
        )
        self.wait_ready()

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while b" ready." not in self.log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start:\n{self.output()}")
            time.sleep(0.1)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._fh.close()


def wait_until(check: Callable[[], object], what: str, timeout_s: float = 30.0) -> None:
    """Poll ``check`` every 0.1 s until it is true; AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(0.1)


def register(client: Client, directory: Path) -> str:
    """Register the model in ``directory``; returns its ``name@version``."""
    return str(client.registry.register(build_spec(directory)).ref)


def column(table: Any, name: str) -> np.ndarray:
    """A result column as a numpy array, (N, k) for fixed-size-list columns."""
    col = table.column(name).combine_chunks()
    if hasattr(col.type, "list_size"):
        return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
    if hasattr(col, "to_numpy_ndarray"):
        return col.to_numpy_ndarray()
    return col.to_numpy(zero_copy_only=False)


def batch_stats(r: Any, key: str, ready: Any = bool, timeout_s: float = 5.0) -> dict[bytes, bytes]:
    """The worker's batch-stats hash once ``ready(hash)`` holds: the worker writes it
    off the model's path, a few tens of milliseconds after the results."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = r.hgetall(key)
        if ready(stats) or time.monotonic() > deadline:
            return dict(stats)
        time.sleep(0.05)
