"""A real Prometheus server scrapes two real workers; the shipped rules pass promtool.

Prometheus is the OS package (``apt-get install prometheus``: /usr/bin/prometheus and
promtool). It scrapes both workers' metrics endpoints every second and loads the
project's own alert rules, so the recording rules run on real series too.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hetbatch.producers import Client
from hetbatch.worker.devtools.redis_server import free_port
from tests.kit.helpers import ROOT, WorkerProcess, column, register
from tests.kit.models import Built, sklearn_model

RULES = ROOT / "deploy" / "prometheus"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (apt-get install prometheus)"
)
ROWS = (10, 20, 30, 40, 50, 60)


def promtool(*args: str) -> str:
    assert PROMTOOL is not None
    done = subprocess.run([PROMTOOL, *args], cwd=RULES, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@needs_promtool
def test_the_shipped_alert_rules_pass_promtool_check_rules() -> None:
    assert "SUCCESS: 6 rules found" in promtool("check", "rules", "alerts.yml")


@needs_promtool
def test_each_alert_fires_on_its_series_and_not_on_a_healthy_one() -> None:
    assert "SUCCESS" in promtool("test", "rules", "alerts.test.yml")


@needs_promtool
def test_the_example_prometheus_config_is_valid() -> None:
    assert "is valid prometheus config" in promtool("check", "config", "prometheus.yml")


class Prometheus:
    """A real prometheus server on a free port with its storage in ``folder``, stopped by pid."""

    def __init__(self, folder: Path, targets: list[str]) -> None:
        assert PROMETHEUS is not None
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES / "alerts.yml")],
            "scrape_configs": [{"job_name": "hetbatch-workers", "static_configs": [{"targets": targets}]}],
        }
        (folder / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.log = open(folder / "prometheus.log", "wb")  # noqa: SIM115  # closed in stop()
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.wait(lambda: urllib.request.urlopen(f"{self.base}/-/ready", timeout=2).status == 200, "ready")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        reply = json.loads(urllib.request.urlopen(url, timeout=10).read())
        assert reply["status"] == "success", reply
        return list(reply["data"]["result"])

    def scalar(self, promql: str) -> float | None:
        found = self.query(promql)
        return float(found[0]["value"][1]) if found else None

    def wait(self, ready: Any, what: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if ready():
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"prometheus: {what} not reached in {timeout_s} s")
            time.sleep(0.25)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def workers(private_redis: str, work_dir: Path) -> Iterator[list[int]]:
    ports = [free_port(), free_port()]
    procs = []
    try:
        for i, port in enumerate(ports):
            env = {"HETBATCH_METRICS_PORT": str(port), "HETBATCH_METRICS_ADDRESS": "127.0.0.1"}
            procs.append(WorkerProcess(private_redis, work_dir, "--concurrency", "4", "--name", f"prom-{i}@localhost",
                                       env=env))  # fmt: skip
        yield ports
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture(scope="module")
def iris(work_dir: Path) -> Built:
    return sklearn_model(work_dir / "prom-iris", "prom-iris", "iris", trees=5)


@needs_prometheus
def test_promql_counts_the_jobs_and_rows_two_workers_served(
    private_redis: str, workers: list[int], iris: Built, tmp_path: Path
) -> None:
    server = Prometheus(tmp_path, [f"127.0.0.1:{p}" for p in workers])
    try:
        server.wait(lambda: server.scalar('count(up{job="hetbatch-workers"} == 1)') == 2, "both workers up")
        X = np.tile(iris.X, (2, 1))
        with Client.from_url(private_redis) as client:
            ref = register(client, iris.directory)
            starts = np.cumsum((0, *ROWS))
            jobs = [client.submit(ref, X[s : s + n]) for s, n in zip(starts, ROWS, strict=False)]
            for job, s, n in zip(jobs, starts, ROWS, strict=False):
                out = job.result(timeout_s=120)
                np.testing.assert_array_equal(column(out, "label"), iris.model.predict(X[s : s + n]))
        model = f'model="{ref}"'
        jobs_q = f'sum(hetbatch_jobs_total{{{model}, outcome="ok"}})'
        server.wait(lambda: server.scalar(jobs_q) == len(ROWS), f"{jobs_q} == {len(ROWS)}")
        assert server.scalar(f'sum(hetbatch_rows_total{{{model}, outcome="ok"}})') == sum(ROWS)
        assert server.scalar(f'sum(hetbatch_jobs_total{{{model}, outcome!="ok"}})') in (None, 0.0)
        by_worker = {r["metric"]["instance"]: float(r["value"][1]) for r in
                     server.query(f'sum by (instance) (hetbatch_jobs_total{{{model}}})')}  # fmt: skip
        print(f"jobs per worker as Prometheus saw them: {by_worker}")
        # The recording rule over both workers' backlog gauges: everything answered, nothing left.
        server.wait(lambda: server.scalar('queue:hetbatch_backlog:jobs{queue="sklearn.cpu"}') == 0, "backlog 0")
        assert len(server.query('hetbatch_backlog{queue="sklearn.cpu", state="reserved"}')) == 2  # one per worker
        assert server.scalar("max(hetbatch_dead_letters)") == 0
    finally:
        server.stop()
