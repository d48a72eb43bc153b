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
from hetbatch.producers.protocol.keys import Keys
from hetbatch.producers.protocol.wire import DEVICE_KEY
from hetbatch.worker.modelops.registration import build_spec
from hetbatch.worker.pool import NoGpu, Supervision, check_gpu, pool_env, spawn_gpu_workers
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


def test_an_inherited_device_list_is_indexed_not_overwritten() -> None:
    given = "GPU-8f2b1c4e-aaaa-bbbb-cccc-0123456789ab,MIG-5c1d2e3f-dddd-eeee-ffff-0123456789ab"
    assert pool_env("gpu", "1", given) == {"CUDA_VISIBLE_DEVICES": given.split(",")[1]}
    assert pool_env("gpu", "0", "4,5") == {"CUDA_VISIBLE_DEVICES": "4"}
    with pytest.raises(NoGpu, match="given 2 GPU"):
        pool_env("gpu", "2", "4,5")


def _gpu_visible() -> bool:
    try:
        check_gpu()
    except NoGpu:
        return False
    return True


@pytest.mark.parametrize("visible", [None, ""])
def test_a_gpu_pool_without_a_gpu_exits_non_zero_at_once_with_one_line(visible: str | None) -> None:
    if _gpu_visible():
        pytest.skip("this machine has a GPU")
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "HETBATCH_GPU_CHECK")}
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "hetbatch", "worker", "--pool", "gpu", "--redis-url", "redis://127.0.0.1:1/0"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env,
    )  # fmt: skip
    assert done.returncode != 0 and time.monotonic() - started < 30
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("hetbatch worker: --pool gpu:"), done.stderr
    assert ("hides every GPU" if visible == "" else "nvidia-smi") in lines[0]


def test_the_parent_of_per_gpu_workers_notices_a_dead_child(capfd: pytest.CaptureFixture[str]) -> None:
    """Without a GPU every child dies at its device check: the parent restarts each once
    (after a backoff), then stops them all and exits non-zero."""
    if _gpu_visible():
        pytest.skip("this machine has a GPU: its children would not die")
    started = time.monotonic()
    code = spawn_gpu_workers(["0", "1"], ["--redis-url", "redis://127.0.0.1:1/0"], Supervision(1, 60, 0.1, 0.1))
    err = capfd.readouterr().err
    assert code == 1 and time.monotonic() - started < 60
    assert err.count("started gpu worker pid") >= 3 and "died 2 times in 60 s; stopping every gpu worker" in err


def test_a_gpu_worker_consumes_tensorflow_gpu_only_where_tensorflow_imports(tmp_path: Path) -> None:
    broken = tmp_path / "site" / "tensorflow"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('this tensorflow is broken')\n")
    probe = "from hetbatch.worker.settings import WorkerSettings; print(WorkerSettings(pool='gpu').queue_names)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), str(ROOT)]))
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    names = done.stdout.strip().splitlines()[-1]
    assert "'torch.gpu'" in names and "'onnx.gpu'" in names and "tensorflow.gpu" not in names


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

    # Without a GPU the pool's device check would stop it at once: skip it, to test the plumbing.
    env = {} if torch.cuda.is_available() else {"HETBATCH_GPU_CHECK": "0"}
    pool = WorkerProcess(redis_url, work_dir, "--pool", "gpu", "--gpus", "0,1", "--concurrency", "2", env=env)
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
        pytest.skip("this machine has CUDA: run python -m scripts.gpu_check itself")


def test_the_gpu_check_script_says_there_is_no_cuda_and_exits_2(tmp_path: Path) -> None:
    _no_cuda()
    out = tmp_path / "check.json"
    done = subprocess.run(
        [sys.executable, "-m", "scripts.gpu_check", "--out", str(out)],
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
        [sys.executable, "-m", "scripts.gpu_check", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    report = json.loads(out.read_text())
    assert done.returncode == 0, done.stdout + done.stderr
    assert report["ok"] and len(report["checks"]) >= 9
    assert report["frameworks"]["torch"]["gpu"]["queue"]["ran_on"] == "cpu"  # the fallback, in a dry run
