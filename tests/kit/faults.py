"""Test-only faults that cannot be produced for real on demand: a model that kills its
worker on a marker value (a poison job, an OOM kill) or that is slow enough to be
killed mid-batch. Run as ``python -m tests.kit.faults worker ...`` (the real ``hetbatch
worker`` with the fault-injecting scikit-learn adapter) or ``python -m tests.kit.faults
prefork ...`` (the same app on Celery's prefork pool, to kill a pool child).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from hetbatch import adapters
from hetbatch.adapters.sklearn import SklearnAdapter
from tests.kit.helpers import ROOT, WorkerProcess

CRASH_EXIT_CODE = 137


class FaultySklearnAdapter(SklearnAdapter):
    """scikit-learn adapter with two test options: ``crash_on`` (a value of feature 0
    that makes the process exit at once, like the OOM killer) and ``sleep_s`` per call."""

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        marker = self.options.get("crash_on")
        if marker is not None and (inputs["X"][:, 0] == marker).any():
            os._exit(CRASH_EXIT_CODE)
        time.sleep(float(self.options.get("sleep_s", 0.0)))
        return super().predict(inputs)


class FaultyWorker(WorkerProcess):
    """A ``hetbatch worker`` (or a prefork Celery worker) whose sklearn adapter injects faults."""

    def __init__(
        self, redis_url: str, log_dir: Path, *args: str, env: dict[str, str] | None = None, mode: str = "worker"
    ) -> None:
        import subprocess

        self.log = log_dir / f"faulty-{mode}-{time.monotonic_ns()}.log"
        full_env = dict(os.environ, HETBATCH_REDIS_URL=redis_url, PYTHONUNBUFFERED="1", **(env or {}))
        full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env["CUDA_VISIBLE_DEVICES"] = ""
        self._fh = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.kit.faults", mode, "--loglevel", "INFO", *args],
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=ROOT,
        )
        self.wait_ready()


def _prefork(argv: list[str]) -> int:
    from hetbatch.worker.app import make_app
    from hetbatch.worker.settings import WorkerSettings

    settings = WorkerSettings.from_env()
    app = make_app(settings)
    app.worker_main(
        [
            "worker",
            "-P",
            "prefork",
            "-c",
            "1",
            "-Q",
            ",".join(settings.queue_names),
            "--without-mingle",
            "--without-gossip",
            "-n",
            f"prefork-{os.getpid()}@%h",
            *argv,
        ]
    )
    return 0


def main(argv: list[str]) -> int:
    adapters.ADAPTERS["sklearn"] = ("tests.kit.faults:FaultySklearnAdapter", "sklearn")
    if argv and argv[0] == "prefork":
        return _prefork(argv[1:])
    from hetbatch.worker.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
