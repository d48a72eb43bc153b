"""GPU pools on a machine without a GPU: a gpu model's job waits in its gpu queue (never
runs on a cpu worker) unless it allows ``fallback = "cpu"``, and the result says which
device ran it; ``--gpus 0,1`` starts one worker process per GPU."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from hetbatch.producers import Client, JobFailed, Status
from hetbatch.producers.protocol.wire import DEVICE_KEY, Keys
from hetbatch.worker.modelops.registration import build_spec
from hetbatch.worker.pool import pool_env
from tests.kit.helpers import ROOT, WorkerProcess, column
from tests.kit.models_dl import DLBuilt, torch_mlp


@pytest.fixture(scope="module")
def mlp(work_dir: Path) -> DLBuilt:
    return torch_mlp(work_dir / "gpu-mlp", "gpu-mlp")


def register_gpu(client: Client, built: DLBuilt, name: str, **config: object) -> str:
    return str(client.registry.register(build_spec(built.directory, name=name, device="gpu", **config)).ref)


def queued(redis_url: str, queue: str) -> int:
    """Messages waiting in a kombu Redis queue (one list per priority step)."""
    r = redis.Redis.from_url(redis_url)
    keys = [k for k in r.keys(queue + "*") if r.type(k) == b"list"]
    return sum(int(r.llen(k)) for k in keys)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_cpu_pool_hides_every_gpu_and_a_gpu_worker_sees_only_its_own() -> None:
    assert pool_env("cpu") == {"CUDA_VISIBLE_DEVICES": ""}
    assert pool_env("cpu", "0") == {"CUDA_VISIBLE_DEVICES": ""}
    assert pool_env("gpu", "1") == {"CUDA_VISIBLE_DEVICES": "1"}
    assert pool_env("gpu") == {}


def test_the_cpu_worker_started_with_no_gpu_visible(cpu_worker: WorkerProcess) -> None:
    assert "pool=cpu CUDA_VISIBLE_DEVICES=''" in cpu_worker.output()


def test_a_fallback_model_runs_on_the_cpu_pool_when_no_gpu_worker_is_up_and_says_so(
    client: Client, cpu_worker: WorkerProcess, mlp: DLBuilt
) -> None:
    ref = register_gpu(client, mlp, "gpu-mlp-fallback", fallback="cpu")
    assert client.spec(ref).queue == "torch.gpu"
    out = client.predict(ref, mlp.inputs, timeout_s=120)
    assert out.schema.metadata[DEVICE_KEY] == b"cpu"
    for name, want in mlp.expected.items():
        assert abs(column(out, name) - want).max() <= 1e-5


def test_a_cpu_worker_refuses_a_gpu_model_without_fallback_that_reaches_it(
    client: Client, cpu_worker: WorkerProcess, mlp: DLBuilt, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = register_gpu(client, mlp, "gpu-mlp-misrouted")
    monkeypatch.setattr(client, "_route", lambda spec: "torch.cpu")  # a wrong --queues or a hand-made task
    with pytest.raises(JobFailed, match="without fallback") as info:
        client.predict(ref, mlp.inputs, timeout_s=120)
    assert info.value.remote_type == "ModelLoadError"


def test_a_gpu_job_waits_for_a_gpu_worker_and_one_per_gpu_is_started(
    client: Client, cpu_worker: WorkerProcess, mlp: DLBuilt, redis_url: str, work_dir: Path
) -> None:
    import torch

    ref = register_gpu(client, mlp, "gpu-mlp-only")
    before = queued(redis_url, "torch.gpu")
    job = client.submit(ref, mlp.inputs)
    time.sleep(3)  # the cpu worker had time to take it, had it been routed there
    assert job.status() is Status.PENDING
    assert queued(redis_url, "torch.gpu") == before + 1
    alive = Keys().alive("torch.gpu")
    r = redis.Redis.from_url(redis_url)
    assert not r.exists(alive)

    pool = WorkerProcess(redis_url, work_dir, "--pool", "gpu", "--gpus", "0,1", "--concurrency", "2")
    try:
        deadline = time.monotonic() + 120
        while pool.output().count(" ready.") < 2:
            assert pool.alive() and time.monotonic() < deadline, pool.output()
            time.sleep(0.2)
        log = pool.output()
        assert "pool=gpu CUDA_VISIBLE_DEVICES='0'" in log and "pool=gpu CUDA_VISIBLE_DEVICES='1'" in log
        children = [int(p) for p in re.findall(r"started gpu worker pid (\d+)", log)]
        assert len(children) == 2
        assert r.pttl(alive) > 0
        fallback = client.spec(register_gpu(client, mlp, "gpu-mlp-fallback-2", fallback="cpu"))
        assert client._route(fallback) == "torch.gpu"  # a gpu worker is up: no fallback
        if torch.cuda.is_available():
            assert job.result(timeout_s=120).schema.metadata[DEVICE_KEY] == b"gpu"
        else:  # the gpu worker takes it and refuses to run it on its CPU
            with pytest.raises(JobFailed, match="no CUDA device") as info:
                job.result(timeout_s=120)
            assert info.value.remote_type == "ModelLoadError"
    finally:
        pool.stop()
    left = [pid for pid in children if _running(pid)]
    for pid in left:  # our own children, by pid: do not leak them into the next test
        os.kill(pid, signal.SIGKILL)
    assert not left, "stopping the parent must stop every per-GPU worker"
    assert not r.exists(alive)  # a clean stop removes its beat at once


def _no_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: run scripts/gpu_check.py itself")


def test_the_gpu_check_script_says_there_is_no_cuda_and_exits_2(tmp_path: Path) -> None:
    _no_cuda()
    out = tmp_path / "check.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 2, done.stderr
    assert "no CUDA" in done.stderr
    assert json.loads(out.read_text())["error"].startswith("no CUDA")


@pytest.mark.slow
def test_the_gpu_check_script_runs_its_plumbing_on_the_cpu(tmp_path: Path) -> None:
    _no_cuda()
    out = tmp_path / "check.json"
    argv = ["--cpu-dry-run", "--rows", "2048", "--hidden", "64", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), *argv],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    report = json.loads(out.read_text())
    assert done.returncode == 0, done.stdout + done.stderr
    assert report["ok"] and len(report["checks"]) >= 9
    assert report["frameworks"]["torch"]["gpu"]["queue"]["ran_on"] == "cpu"  # the fallback, in a dry run
