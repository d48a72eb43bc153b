"""Chaos run: jobs keep flowing while a worker is SIGKILLed every few seconds and Redis is
SIGKILLed and restarted once; then every job's result is checked.

    python -m scripts.chaos --jobs 5000 --kill-every-s 10 --redis-kill-at-s 30   (from the repo root)

Everything is private: a redis-server with AOF (``appendfsync always``) on a free
port, two real ``hetbatch worker`` processes (one is killed and restarted every
``--kill-every-s``, the other keeps running), a scikit-learn model trained on iris.
Checks: no job lost, every job has exactly one stored result, each result equals the
model's in-process prediction; reports attempts, duplicate executions, re-published
and dead-lettered tasks, and submissions refused while Redis was down.

With ``--model-sleep-ms`` (default 20) both workers run the test kit's scikit-learn
adapter that sleeps that long per model call (tests/kit/faults.py): jobs are in flight
when the victim is killed, so some of them need a second attempt; the report counts
them (``jobs_with_retries``, ``second_attempts``) and a run without any fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hetbatch.producers import BrokerError, Client, ClientSettings
from hetbatch.producers.protocol.keys import Keys
from hetbatch.worker.devtools.redis_server import RedisServer, free_port
from tests.kit.faults import FaultyWorker, faulty_options
from tests.kit.helpers import WorkerProcess, column, register
from tests.kit.models import sklearn_model

FAST_RECOVERY = {
    "HETBATCH_VISIBILITY_TIMEOUT_S": "10",
    "HETBATCH_LEASE_INTERVAL_S": "2",
    "HETBATCH_RESTORE_INTERVAL_S": "1",
    "HETBATCH_OVERDUE_S": "10",
    "HETBATCH_RECONCILE_INTERVAL_S": "3",
    "HETBATCH_CONCURRENCY": "8",
}


@dataclass
class ChaosReport:
    jobs: int
    duration_s: float = 0.0
    worker_kills: int = 0
    redis_kills: int = 0
    refused_while_redis_down: int = 0
    lost: int = 0
    wrong: int = 0
    errors: int = 0
    missing_results: int = 0
    jobs_with_retries: int = 0
    second_attempts: int = 0  # attempts after each job's first, over all jobs
    max_attempts_seen: int = 0
    counters: dict[str, float] = field(default_factory=dict)
    recovery_bound_s: float = 0.0
    recovery_s: float = 0.0  # from the last kill to the last result collected
    rows_per_s: float = 0.0


class _Redis:
    """A private AOF redis-server that can be SIGKILLed and restarted on the same port and data."""

    def __init__(self, aof: bool = True) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="hetbatch-chaos-")
        self.args = ("--dir", self.dir, "--appendonly", "yes", "--appendfsync", "always") if aof else ()
        self.server = RedisServer(*self.args, port=self.port)
        self.url = self.server.url

    def kill_and_restart(self, down_s: float) -> None:
        self.server.kill()
        time.sleep(down_s)
        self.server = RedisServer(*self.args, port=self.port)

    def stop(self) -> None:
        self.server.stop()


def run_chaos(
    jobs: int,
    *,
    kill_every_s: float,
    redis_kill_at_s: float | None,
    rate_per_s: float,
    work_dir: Path,
    log: Any = print,
    model_sleep_s: float = 0.0,
    kills_for_s: float | None = None,
    collect_timeout_s: float = 240.0,
) -> ChaosReport:
    """Run the chaos scenario (see the module docstring) and return its figures.

    Worker kills go on for ``kills_for_s`` after the last submit (default: two kill
    periods); every result is awaited until ``collect_timeout_s`` after that.
    """
    kills_for_s = 2 * kill_every_s if kills_for_s is None else kills_for_s
    report = ChaosReport(jobs=jobs)
    redis_proc = _Redis()
    options = {"sleep_s": model_sleep_s} if model_sleep_s > 0 else None
    built = sklearn_model(work_dir / "iris", "chaos-iris", "iris", options=options)
    # A slow model keeps jobs in the victim's hands when it is killed: they need a second attempt.
    worker_type = FaultyWorker if model_sleep_s > 0 else WorkerProcess
    env = dict(FAST_RECOVERY)
    steady = victim = None
    client = Client(ClientSettings.from_env(redis_url=redis_proc.url, publish_retries=3))
    stop = threading.Event()
    chaos_thread: threading.Thread | None = None
    kills_end = [float("inf")]  # set once every job is submitted
    last_kill = [0.0]
    try:
        with faulty_options():
            register(client, built.directory)
        steady = worker_type(redis_proc.url, work_dir, "--name", "steady@%h", env=env)
        victim = worker_type(redis_proc.url, work_dir, "--name", "victim@%h", env=env)
        rng = np.random.default_rng(0)
        inputs: list[np.ndarray] = []
        submitted: list[Any] = []
        started = time.monotonic()

        def chaos() -> None:
            nonlocal victim
            next_kill = started + kill_every_s
            redis_due = started + redis_kill_at_s if redis_kill_at_s is not None else None
            while not stop.is_set():
                now = time.monotonic()
                if redis_due is not None and now >= redis_due:
                    log(f"[{now - started:6.1f}s] SIGKILL redis (AOF), restarting")
                    redis_proc.kill_and_restart(down_s=1.0)
                    report.redis_kills += 1
                    redis_due = None
                if now >= next_kill and now < kills_end[0] and victim is not None:
                    log(f"[{now - started:6.1f}s] SIGKILL worker pid {victim.proc.pid}")
                    victim.kill()
                    victim.stop()
                    report.worker_kills += 1
                    victim = worker_type(redis_proc.url, work_dir, "--name", f"victim{report.worker_kills}@%h", env=env)
                    last_kill[0] = time.monotonic()
                    next_kill = time.monotonic() + kill_every_s
                time.sleep(0.1)

        chaos_thread = threading.Thread(target=chaos, daemon=True)
        chaos_thread.start()
        for i in range(jobs):
            rows = int(rng.integers(1, 20))
            x = built.X[rng.integers(0, len(built.X), rows)] + rng.normal(0, 0.05, (rows, built.X.shape[1]))
            while True:
                try:
                    submitted.append(client.submit("chaos-iris", x))
                    inputs.append(x)
                    break
                except BrokerError:
                    report.refused_while_redis_down += 1  # not accepted: the caller retries
                    time.sleep(0.5)
            target = started + (i + 1) / rate_per_s
            time.sleep(max(0.0, target - time.monotonic()))
        kills_end[0] = time.monotonic() + kills_for_s
        elapsed = time.monotonic() - started
        log(f"[{elapsed:6.1f}s] all {jobs} jobs submitted; collecting (kills go on {kills_for_s:.0f} s)")
        deadline = kills_end[0] + collect_timeout_s
        for job, x in zip(submitted, inputs, strict=True):
            try:
                out = job.result(timeout_s=max(1.0, deadline - time.monotonic()))
            except Exception as exc:
                name = type(exc).__name__
                report.lost += name in ("JobLost", "JobTimeout")
                report.errors += name not in ("JobLost", "JobTimeout")
                log(f"job {job.id}: {name}: {exc}; attempts: {job.attempts()}")
                continue
            label_ok = np.array_equal(column(out, "label"), built.model.predict(x))
            proba_ok = np.allclose(column(out, "probabilities"), built.model.predict_proba(x), atol=1e-6)
            report.wrong += not (label_ok and proba_ok)
        report.duration_s = time.monotonic() - started
        report.recovery_s = max(0.0, time.monotonic() - max(last_kill[0], started))
        stop.set()
        chaos_thread.join()
        chaos_thread = None
        stored = client.redis.mget([client.keys.result(j.id, 0) for j in submitted])
        report.missing_results = sum(v is None for v in stored)
        attempts = [len(j.attempts()) for j in submitted]
        report.jobs_with_retries = sum(a > 1 for a in attempts)
        report.second_attempts = sum(a - 1 for a in attempts if a > 1)
        report.max_attempts_seen = max(attempts, default=0)
        report.counters = client.ledger.counters()
        report.counters["dlq_length"] = float(client.redis.llen(Keys().dlq()))
        report.recovery_bound_s = float(env["HETBATCH_VISIBILITY_TIMEOUT_S"]) + float(
            env["HETBATCH_RESTORE_INTERVAL_S"]
        )
        report.rows_per_s = sum(len(x) for x in inputs) / report.duration_s
    finally:
        stop.set()
        if chaos_thread is not None:
            chaos_thread.join()
        client.close()
        for proc in (steady, victim):
            if proc is not None:
                proc.stop()
        redis_proc.stop()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--kill-every-s", type=float, default=10.0)
    parser.add_argument("--redis-kill-at-s", type=float, default=30.0, help="negative: never")
    parser.add_argument(
        "--kills-for-s", type=float, default=None, help="kills after the last submit (default 2 periods)"
    )
    parser.add_argument("--rate-per-s", type=float, default=80.0, help="jobs submitted per second")
    parser.add_argument("--model-sleep-ms", type=float, default=20.0, help="per model call: jobs in flight get killed")
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    with tempfile.TemporaryDirectory(prefix="hetbatch-chaos-") as tmp:
        report = run_chaos(
            args.jobs,
            kill_every_s=args.kill_every_s,
            redis_kill_at_s=args.redis_kill_at_s if args.redis_kill_at_s >= 0 else None,
            rate_per_s=args.rate_per_s,
            model_sleep_s=args.model_sleep_ms / 1000,
            kills_for_s=args.kills_for_s,
            work_dir=Path(tmp),
        )
    text = json.dumps(asdict(report), indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    ok = report.lost == report.wrong == report.errors == report.missing_results == 0
    # A run whose kills never caught a job in flight proves nothing about redelivery.
    ok = ok and (report.jobs_with_retries > 0 or args.model_sleep_ms <= 0 or report.worker_kills == 0)
    print("OK: 0 lost, every job one result equal to the in-process prediction" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
