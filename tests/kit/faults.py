"""Test-only faults that cannot be produced for real on demand: a model that kills its
worker on a marker value (a poison job, an OOM kill) or that is slow enough to be
killed mid-batch. Run as ``python -m tests.kit.faults worker ...`` (the real ``hetbatch
worker`` with the fault-injecting scikit-learn adapter) or ``python -m tests.kit.faults
prefork ...`` (the same app on Celery's prefork pool, to kill a pool child).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hetbatch import adapters
from hetbatch.adapters.sklearn import SklearnAdapter, SklearnOptions
from tests.kit.helpers import ROOT, WorkerProcess

CRASH_EXIT_CODE = 137


@dataclass(frozen=True)
class FaultyOptions(SklearnOptions):
    """``crash_on``: a value of feature 0 that makes the process exit at once, like the
    OOM killer; ``sleep_s``: seconds each call sleeps (not the all-zero warm-up call);
    ``load_sleep_s``: seconds the load sleeps (a big model); ``log_calls``: each call
    prints ``faulty-call zeros=<0|1> start=<epoch s> end=<epoch s>`` to the worker log."""

    crash_on: float | None = None
    sleep_s: float = 0.0
    load_sleep_s: float = 0.0
    log_calls: bool = False


class FaultySklearnAdapter(SklearnAdapter):
    """scikit-learn adapter with the test options of ``FaultyOptions``."""

    options_type = FaultyOptions
    options: FaultyOptions

    def _load(self) -> None:
        time.sleep(self.options.load_sleep_s)
        super()._load()

    def _predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        marker = self.options.crash_on
        if marker is not None and (inputs["X"][:, 0] == marker).any():
            os._exit(CRASH_EXIT_CODE)
        started = time.time()  # wall clock: the test compares it with its own
        zeros = not inputs["X"].any()
        if not zeros:  # the load's warm-up call is all zeros: it does not sleep
            time.sleep(self.options.sleep_s)
        out = super()._predict(inputs)
        if self.options.log_calls:
            line = f"faulty-call zeros={int(zeros)} start={started:.6f} end={time.time():.6f}"
            print(line, file=sys.stderr, flush=True)
        return out


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
    from hetbatch.worker.process import WorkerProcess
    from hetbatch.worker.settings import WorkerSettings

    WorkerProcess(WorkerSettings.from_env()).run(f"prefork-{os.getpid()}@%h", pool="prefork", extra=argv)
    return 0


FAULTY = ("tests.kit.faults:FaultySklearnAdapter", "sklearn")


@contextlib.contextmanager
def faulty_options() -> Iterator[None]:
    """Within it, this process's scikit-learn adapter is the faulty one: registration checks
    ``[options]`` against the adapter class, and ``sleep_s`` / ``crash_on`` are its options
    (a superset of the stock adapter's, identical without them)."""
    stock = adapters.ADAPTERS["sklearn"]
    adapters.ADAPTERS["sklearn"] = FAULTY
    try:
        yield
    finally:
        adapters.ADAPTERS["sklearn"] = stock


def main(argv: list[str]) -> int:
    adapters.ADAPTERS["sklearn"] = FAULTY
    if argv and argv[0] == "prefork":
        return _prefork(argv[1:])
    from hetbatch.worker.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
