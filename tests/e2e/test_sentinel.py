"""Redis Sentinel: a master, two replicas and three sentinels (real ``redis-server`` and
``redis-sentinel`` processes on free ports); a worker and a producer given only the
``sentinel://`` URL; the master SIGKILLed while jobs are in flight.

The producer submits with ``wait_replicas=1`` (``WAIT`` after each round trip), so every
accepted job is on a replica when ``submit`` returns: every one must end answered (its
result equal to the model's own output), none lost and none hanging; a submit may fail
with ``BrokerError`` (not accepted) while the new master has no replica yet. The workers
and the producer reach the new master without a restart. The counts and the time from
the kill to the first answer through the new master are printed.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import redis

from hetbatch.producers import Client
from hetbatch.producers.errors import ConfigError, HetbatchError
from hetbatch.producers.protocol.connect import connect
from hetbatch.producers.protocol.sentinel import SentinelUrl, broker
from hetbatch.worker.devtools.redis_server import RedisServer, free_port
from tests.kit.helpers import FAST_RECOVERY, WorkerProcess, column, register, wait_until
from tests.kit.models import Built, sklearn_model

SENTINEL = shutil.which("redis-sentinel")
needs_sentinel = pytest.mark.skipif(
    SENTINEL is None, reason="redis-sentinel not installed (apt-get install redis-sentinel)"
)
MASTER = "hetbatch"
JOBS = 2000


class Sentinels:
    """Three redis-sentinel processes watching one master group, stopped by pid."""

    def __init__(self, master_port: int, count: int = 3) -> None:
        assert SENTINEL is not None
        self.dir = Path(tempfile.mkdtemp(prefix="hetbatch-sentinel-"))
        self.ports = [free_port() for _ in range(count)]
        self.procs = []
        for port in self.ports:
            conf = self.dir / f"sentinel-{port}.conf"  # sentinel rewrites its config: one file each
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {master_port} 2\n"
                f"sentinel down-after-milliseconds {MASTER} 1000\n"
                f"sentinel failover-timeout {MASTER} 5000\n"
                f"sentinel parallel-syncs {MASTER} 1\n"
            )
            self.procs.append(
                subprocess.Popen([SENTINEL, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        self.url = ";".join(f"sentinel://127.0.0.1:{p}" for p in self.ports) + f"?master_name={MASTER}"

    def master_port(self) -> int | None:
        for port in self.ports:
            try:
                found = redis.Redis(port=port, socket_timeout=1).sentinel_get_master_addr_by_name(MASTER)
                if found:
                    return int(found[1])
            except redis.RedisError:
                continue
        return None

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
            proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _in_sync(replica: redis.Redis) -> bool:
    return bool(replica.info("replication").get("master_link_status") == "up")


@pytest.fixture()
def cluster() -> Iterator[tuple[RedisServer, list[RedisServer], Sentinels]]:
    master = RedisServer()
    # Two replicas: after a failover the new master still has one, so WAIT 1 can succeed.
    replicas = [RedisServer("--replicaof", "127.0.0.1", str(master.port)) for _ in range(2)]
    for replica in replicas:
        wait_until(partial(_in_sync, redis.Redis(port=replica.port)), "replica in sync")
    sentinels = Sentinels(master.port)
    s = redis.Redis(port=sentinels.ports[0])
    # Each sentinel has found the others and the replicas: a failover can be agreed.
    wait_until(lambda: int(s.sentinel_master(MASTER).get("num-other-sentinels", 0)) == 2, "sentinels meet")
    wait_until(lambda: int(s.sentinel_master(MASTER).get("num-slaves", 0)) == 2, "sentinels see the replicas")
    yield master, replicas, sentinels
    sentinels.stop()
    for replica in replicas:
        replica.stop()
    master.stop()


def test_a_sentinel_url_parses_into_kombus_form_and_redis_py_sentinels() -> None:
    url = "sentinel://u:p%40ss@h1:26379/2;sentinel://h2:26380?master_name=grp&sentinel_password=s"
    parsed = SentinelUrl.parse(url)
    assert parsed == SentinelUrl((("h1", 26379), ("h2", 26380)), "grp", 2, "u", "p@ss", "s")
    kombu_url, options = broker(url)
    assert kombu_url == "sentinel://u:p@ss@h1:26379/2;sentinel://u:p@ss@h2:26380/2"
    assert options["master_name"] == "grp" and options["sentinel_kwargs"]["password"] == "s"
    assert broker("redis://h:1/0") == ("redis://h:1/0", {})
    for bad, why in [("sentinel://h1:1", "master_name"), ("sentinel://h1?master_name=m", "host:port"),
                     ("sentinel://h1:1?master_name=m&colour=red", "unknown")]:  # fmt: skip
        with pytest.raises(ConfigError, match=why):
            SentinelUrl.parse(bad)


@needs_sentinel
def test_jobs_in_flight_survive_a_sigkilled_master(
    cluster: tuple[RedisServer, list[RedisServer], Sentinels], work_dir: Path
) -> None:
    master, replicas, sentinels = cluster
    url = sentinels.url
    assert connect(url).ping()
    built: Built = sklearn_model(work_dir / "sentinel-iris", "sentinel-iris", "iris", trees=5)
    worker = WorkerProcess(url, work_dir, "--concurrency", "8", env=FAST_RECOVERY)
    outcomes: Counter[str] = Counter()
    killed_at: list[float] = []
    messages: set[str] = set()
    try:
        # 7 tries back off 6.3 s in all: longer than a failover here (docs/scaling.md), so no submit fails.
        with Client.from_url(url, publish_retries=7, wait_replicas=1, wait_timeout_ms=2000) as client:
            ref = register(client, built.directory)
            rows = [built.X[i % len(built.X) : i % len(built.X) + 1] for i in range(JOBS)]
            expected = built.model.predict(built.X)
            jobs: list[object] = [None] * JOBS

            def submit_all() -> None:
                for i in range(JOBS):
                    try:
                        jobs[i] = client.submit(ref, rows[i])
                    except HetbatchError as exc:
                        jobs[i] = exc
                    time.sleep(0.002)  # ~ a steady producer, so the kill lands mid-stream

            client.predict(ref, built.X[:1], timeout_s=120)  # loaded: the kill, not the model load, is timed
            producer = threading.Thread(target=submit_all)
            producer.start()
            wait_until(lambda: sum(j is not None for j in jobs) >= JOBS // 3, "a third submitted", 120)
            killed_at.append(time.monotonic())
            master.kill()
            # A second producer's high-priority job (served before the backlog): the first answer after the kill.
            with Client.from_url(url) as probe:
                while True:
                    try:
                        probe.submit(ref, built.X[:1], priority="high").result(timeout_s=5)
                        break
                    except HetbatchError:
                        assert time.monotonic() - killed_at[0] < 120, "no answer within 120 s of the kill"
            recovered_s = time.monotonic() - killed_at[0]
            producer.join(timeout=300)
            assert not producer.is_alive(), "submitting stalled after the failover"
            deadline = time.monotonic() + 120  # all jobs together: a lost one must not cost 120 s each
            for i, job in enumerate(jobs):
                if isinstance(job, Exception):
                    outcomes[f"submit:{type(job).__name__}"] += 1
                    messages.add(f"submit: {job}")
                    continue
                try:
                    out = job.result(timeout_s=max(0.5, deadline - time.monotonic()))  # type: ignore[attr-defined]
                except HetbatchError as exc:
                    outcomes[type(exc).__name__] += 1
                    messages.add(f"{type(exc).__name__}: {exc}")
                    continue
                assert column(out, "label")[0] == expected[i % len(built.X)]
                outcomes["answered"] += 1
            # The new master serves a fresh job end to end, through the same client and worker.
            fresh = client.predict(ref, built.X[:5], timeout_s=60)
            np.testing.assert_array_equal(column(fresh, "label"), expected[:5])
        new_port = sentinels.master_port()
        print(f"\nsentinel failover: master {master.port} -> {new_port}; first answer {recovered_s:.1f} s after the "
              f"kill; outcomes of {JOBS} jobs: {dict(outcomes)}\n" + "\n".join(sorted(messages)[:5]))  # fmt: skip
        assert new_port in {r.port for r in replicas}
        assert sum(outcomes.values()) == JOBS
        assert outcomes["answered"] >= JOBS * 0.9, outcomes
        # WAIT: every accepted job was on a replica, so none is lost; only submits may fail.
        assert set(outcomes) <= {"answered", "submit:BrokerError"}, outcomes
        assert worker.alive(), "the worker exited instead of reconnecting"
    except BaseException:
        print("worker log (tail):\n" + worker.output()[-8000:])  # why it did not recover
        raise
    finally:
        worker.stop()
