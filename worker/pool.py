"""Worker pools: the devices a pool sees, one supervised process per GPU, and fail-fast checks.

CUDA reads ``CUDA_VISIBLE_DEVICES`` once, when a framework first touches the driver,
and a CUDA context does not survive ``fork``: so each GPU gets its own freshly exec'd
worker process with the variable set before any framework is imported, and a cpu pool
hides every GPU. ``--gpus`` values are indices into the devices this process was given:
an inherited ``CUDA_VISIBLE_DEVICES`` (indices, UUIDs or MIG instances, as a container
runtime or a scheduler sets it) is indexed, never replaced by raw indices.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from types import FrameType

__all__ = [
    "DEVICE_FAILED_EXIT",
    "NoGpu",
    "Supervision",
    "check_gpu",
    "gpu_frameworks",
    "pool_env",
    "spawn_gpu_workers",
    "visible_gpus",
]

log = logging.getLogger(__name__)

# Exit status of a worker whose device failed for good (a sticky CUDA error): its
# unacknowledged jobs are redelivered to another process.
DEVICE_FAILED_EXIT = 3

# Framework -> the module that must import for its gpu queue to be consumed.
_GPU_FRAMEWORK_MODULES = {"onnx": "onnxruntime", "torch": "torch", "tensorflow": "tensorflow"}

# Counts the CUDA devices through the driver API only (no framework import, no context),
# in a child process, so this process's CUDA state stays untouched until a model loads.
_COUNT_DEVICES = """
import ctypes, sys
try:
    cuda = ctypes.CDLL("libcuda.so.1")
except OSError as exc:
    print(f"no CUDA driver (libcuda.so.1: {exc})"); sys.exit(1)
status = cuda.cuInit(0)
count = ctypes.c_int(0)
if status == 0:
    status = cuda.cuDeviceGetCount(ctypes.byref(count))
if status != 0:
    print(f"the CUDA driver failed to initialize (CUresult {status})"); sys.exit(1)
print(count.value)
"""


class NoGpu(RuntimeError):
    """A gpu pool was asked for where no CUDA device is usable."""


def visible_gpus(env: dict[str, str] | None = None) -> list[str]:
    """The devices this process may give to gpu workers: the inherited
    ``CUDA_VISIBLE_DEVICES`` entries, else the driver's device indices.

    Raises:
        NoGpu: none is visible (one line that says what to check).
    """
    env = dict(os.environ) if env is None else env
    inherited = env.get("CUDA_VISIBLE_DEVICES")
    if inherited is not None and inherited.strip() in ("", "-1", "none", "NoDevFiles"):
        raise NoGpu(f"CUDA_VISIBLE_DEVICES={inherited!r} hides every GPU; unset it or start a cpu pool")
    count = check_gpu(env)
    if inherited is not None:
        return [d.strip() for d in inherited.split(",") if d.strip()][:count] or [str(i) for i in range(count)]
    return [str(i) for i in range(count)]


def check_gpu(env: dict[str, str] | None = None, timeout_s: float = 20.0) -> int:
    """How many CUDA devices the driver shows under ``env``; at least one.

    Raises:
        NoGpu: no driver, a driver that fails to initialize, or no device.
    """
    try:
        done = subprocess.run(
            [sys.executable, "-c", _COUNT_DEVICES], env=env, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired as exc:
        raise NoGpu(f"the CUDA driver did not answer within {timeout_s:.0f} s; check nvidia-smi") from exc
    answer = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr.strip()[-200:]
    if done.returncode != 0 or not answer.isdigit():
        raise NoGpu(f"{answer}; a gpu pool needs the NVIDIA driver and a visible GPU (check nvidia-smi)")
    if int(answer) == 0:
        raise NoGpu("the CUDA driver shows no device; check nvidia-smi and CUDA_VISIBLE_DEVICES")
    return int(answer)


def pool_env(pool: str, gpu: str | None = None, inherited: str | None = None) -> dict[str, str]:
    """Variables to set before any framework import: no GPU for ``cpu``; for ``gpu``, the
    device ``gpu`` (an index into ``inherited``'s entries when the process was given a list).

    Raises:
        NoGpu: ``gpu`` is an index past the inherited list.
    """
    if pool == "cpu":
        return {"CUDA_VISIBLE_DEVICES": ""}
    if gpu is None:
        return {}
    entries = [d.strip() for d in (inherited or "").split(",") if d.strip()]
    if entries and gpu.isdigit():
        if int(gpu) >= len(entries):
            given = f"{len(entries)} GPU(s) (CUDA_VISIBLE_DEVICES={inherited})"
            raise NoGpu(f"--gpus {gpu}: this process was given {given}; --gpus indexes those")
        return {"CUDA_VISIBLE_DEVICES": entries[int(gpu)]}
    return {"CUDA_VISIBLE_DEVICES": gpu}


@cache
def gpu_frameworks() -> tuple[str, ...]:
    """The frameworks whose gpu queue this process can serve: those whose module imports."""
    usable = []
    for framework, module in _GPU_FRAMEWORK_MODULES.items():
        try:
            importlib.import_module(module)
        except Exception as exc:  # not installed, or a broken install: either way not served
            log.info("not consuming %s.gpu: %s does not import (%s)", framework, module, exc)
            continue
        usable.append(framework)
    return tuple(usable)


@dataclass(frozen=True)
class Supervision:
    """How the parent of per-GPU workers treats a child that died.

    Attributes:
        restarts: restarts allowed per child within ``window_s``; past that, every
            child is stopped and the parent exits non-zero.
        window_s: seconds over which restarts are counted.
        backoff_s: first wait before a restart, doubled each time up to ``backoff_max_s``.
        backoff_max_s: longest wait before a restart.
    """

    restarts: int = 5
    window_s: float = 600.0
    backoff_s: float = 1.0
    backoff_max_s: float = 60.0


def spawn_gpu_workers(gpus: Sequence[str], worker_args: Sequence[str], supervision: Supervision | None = None) -> int:
    """Run ``hetbatch worker --pool gpu`` once per GPU, restart a child that dies, and
    wait until all have stopped.

    SIGTERM and SIGINT to this process are passed on as SIGTERM (Celery's warm
    shutdown). The children run in their own sessions, so a Ctrl-C reaches each once.
    A child that exits non-zero while no shutdown was asked for is restarted after a
    backoff; one that dies more than ``supervision.restarts`` times within the window
    stops them all.

    Returns:
        0 after a clean shutdown; otherwise the failing child's exit status (1 if it was
        killed by a signal).
    """
    policy = supervision or Supervision()
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    envs = {gpu: dict(os.environ, **pool_env("gpu", gpu, inherited)) for gpu in gpus}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    deaths: dict[str, list[float]] = {gpu: [] for gpu in gpus}
    due: dict[str, float] = {}
    stopping = [False]

    def start(gpu: str) -> None:
        # The child gets the one device as its whole world: inside it, that GPU is index 0.
        argv = [sys.executable, "-m", "hetbatch", "worker", "--pool", "gpu", *worker_args]
        procs[gpu] = subprocess.Popen(argv, env=envs[gpu], start_new_session=True)
        device = envs[gpu]["CUDA_VISIBLE_DEVICES"]
        print(f"hetbatch: started gpu worker pid {procs[gpu].pid} with CUDA_VISIBLE_DEVICES={device}", file=sys.stderr)

    def stop_all(signum: int = signal.SIGTERM, frame: FrameType | None = None) -> None:
        stopping[0] = True
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()

    previous = {s: signal.signal(s, stop_all) for s in (signal.SIGTERM, signal.SIGINT)}
    failure = 0
    try:
        for gpu in gpus:
            start(gpu)
        while procs or due:
            time.sleep(0.2)
            now = time.monotonic()
            for gpu, proc in list(procs.items()):
                code = proc.poll()
                if code is None:
                    continue
                del procs[gpu]
                if stopping[0]:
                    continue
                # A worker never exits on its own: whatever its status, it died.
                deaths[gpu] = [t for t in deaths[gpu] if now - t < policy.window_s] + [now]
                print(f"hetbatch: gpu worker {gpu} (pid {proc.pid}) exited with status {code}", file=sys.stderr)
                if len(deaths[gpu]) > policy.restarts:
                    print(
                        f"hetbatch: gpu worker {gpu} died {len(deaths[gpu])} times in {policy.window_s:.0f} s; "
                        "stopping every gpu worker",
                        file=sys.stderr,
                    )
                    failure = code if code > 0 else 1
                    stop_all()
                    continue
                due[gpu] = now + min(policy.backoff_max_s, policy.backoff_s * 2 ** (len(deaths[gpu]) - 1))
            for gpu, when in list(due.items()):
                if stopping[0]:
                    del due[gpu]
                elif now >= when:
                    del due[gpu]
                    start(gpu)
        return failure
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
