"""Graceful scale-in: SIGTERM to a busy worker finishes its running batches, gives its
reserved Celery messages and its lane-held jobs back at once (not after the visibility
timeout), and exits; a second worker answers all of them.

The model sleeps 4 s per call, so when the SIGTERM comes worker A runs one batch, holds
prefetched Celery messages and lane jobs; the visibility timeout is 300 s, so a job
that waited for it would fail the test by minutes.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import redis

from hetbatch.producers import Client
from hetbatch.producers.protocol.keys import Keys, lane_list
from hetbatch.worker.ops.backlog import QueueBacklog, measure
from tests.kit.faults import FaultyWorker
from tests.kit.helpers import column, register
from tests.kit.models import sklearn_model

QUEUE = "sklearn.cpu"
VISIBILITY_S = 300
CELERY_JOBS = 4  # 2 threads x prefetch 2: 2 run, 2 wait in the worker's pool queue
LANE_JOBS = 8  # two lane batches of 4, one slot each
ENV = {
    "HETBATCH_SHM_DIR": "",
    "HETBATCH_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S),
    "HETBATCH_RESTORE_INTERVAL_S": "1",
    "HETBATCH_LEASE_INTERVAL_S": "1",
    "HETBATCH_PREFETCH_MULTIPLIER": "2",
    "HETBATCH_LANE_BATCH": "4",
    "HETBATCH_LANE_SLOTS": "2",
    "HETBATCH_MAX_BATCH_ROWS": "2",  # one 4 s call per two rows: the worker stays busy
}


def _wait(found: Callable[[], QueueBacklog], ready: Callable[[QueueBacklog], bool], timeout_s: float) -> QueueBacklog:
    deadline = time.monotonic() + timeout_s
    while True:
        now = found()
        if ready(now) or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def test_sigterm_gives_reserved_and_lane_held_jobs_back_at_once(private_redis: str, work_dir: Path) -> None:
    slow = sklearn_model(work_dir / "scale-in", "scale-in", "iris", trees=3, options={"sleep_s": 4.0})
    r = redis.Redis.from_url(private_redis)
    keys = Keys()
    a: FaultyWorker | None = None
    b: FaultyWorker | None = None
    try:
        with Client.from_url(private_redis) as celery, Client.from_url(private_redis, lane_max_rows=16) as lane:
            ref = register(celery, slow.directory)
            # Queued before worker A starts, so its lane pops full batches (BLMPOP takes
            # whatever is there); the key is what a lane-draining worker's heartbeat writes.
            r.set(keys.alive(lane_list(QUEUE)), "test", px=60_000)
            rows = [slow.X[i : i + 1] for i in range(CELERY_JOBS + LANE_JOBS)]
            jobs = [celery.submit(ref, x) for x in rows[:CELERY_JOBS]]
            jobs += [lane.submit(ref, x) for x in rows[CELERY_JOBS:]]
            a = FaultyWorker(private_redis, work_dir, "--concurrency", "2", "--queues", QUEUE, env=ENV)

            def now() -> QueueBacklog:
                return measure(r, keys, [QUEUE])[QUEUE]

            taken = _wait(now, lambda q: q.waiting == 0 and q.reserved == CELERY_JOBS and q.held == LANE_JOBS, 10)
            print(f"worker A holds: {taken}")
            assert taken.waiting == 0 and taken.reserved == CELERY_JOBS and taken.held == LANE_JOBS
            b = FaultyWorker(private_redis, work_dir, "--concurrency", "4", "--queues", QUEUE, env=ENV)
            sigterm = time.monotonic()
            a.proc.send_signal(signal.SIGTERM)
            answered: dict[int, float] = {}
            while len(answered) < len(jobs) and time.monotonic() - sigterm < VISIBILITY_S:
                at = time.monotonic() - sigterm
                answered |= {i: at for i, j in enumerate(jobs) if i not in answered and j.done()}
                time.sleep(0.05)
            for i, job in enumerate(jobs):
                np.testing.assert_array_equal(column(job.result(timeout_s=1), "label"), slow.model.predict(rows[i]))
            a.proc.wait(timeout=60)
            exited = time.monotonic() - sigterm
            runs = [[(t.worker.split("@")[0], t.number) for t in job.attempts()] for job in jobs]
            took = max(answered.values())
            print(f"SIGTERM -> last answer {took:.1f} s (visibility timeout {VISIBILITY_S} s); worker A exited "
                  f"with {a.proc.returncode} after {exited:.1f} s")  # fmt: skip
            for i, ran in enumerate(runs):
                path = "celery" if i < CELERY_JOBS else "lane"
                print(f"  job {i} ({path}): answered {answered[i]:5.1f} s after SIGTERM, ran (worker, attempt) {ran}")
            print("\n".join(line for line in a.output().splitlines() if "scale-in" in line or "Restoring" in line))
            assert a.proc.returncode == 0
            assert took < VISIBILITY_S / 5
            assert all(len(ran) == 1 for ran in runs), "a job ran twice"
            assert len({ran[0][0] for ran in runs}) == 2, "worker B answered none of A's jobs"
            assert _wait(now, lambda q: q.total == 0, 10) == QueueBacklog()
    finally:
        if a is not None:
            a.stop()
        if b is not None:
            b.stop()
