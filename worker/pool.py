"""Worker pools: the environment a pool needs, one process per GPU, and liveness beats.

CUDA reads ``CUDA_VISIBLE_DEVICES`` once, when a framework first touches the driver,
and a CUDA context does not survive ``fork``: so each GPU gets its own freshly
exec'd worker process with the variable set before any framework is imported, and a
cpu pool hides every GPU. (Liveness per queue is part of the worker heartbeat in
``worker.ops.status``.)
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from types import FrameType

__all__ = ["pool_env", "spawn_gpu_workers"]

log = logging.getLogger(__name__)


# Deletes the beat only if it is still ours: another worker of the queue may own it now.
def pool_env(pool: str, gpu: str | None = None) -> dict[str, str]:
    """Variables to set before any framework import: none of the GPUs for ``cpu``, one for ``gpu``."""
    if pool == "cpu":
        return {"CUDA_VISIBLE_DEVICES": ""}
    return {"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}


def spawn_gpu_workers(gpus: Sequence[str], worker_args: Sequence[str]) -> int:
    """Run ``hetbatch worker --pool gpu --gpus N`` once per GPU and wait for them all.

    SIGTERM and SIGINT to this process are passed on as SIGTERM (Celery's warm
    shutdown). The children run in their own sessions, so a Ctrl-C reaches each once.

    Returns:
        The highest exit status of the children.
    """
    procs: list[subprocess.Popen[bytes]] = []
    for gpu in gpus:
        argv = [sys.executable, "-m", "hetbatch", "worker", "--pool", "gpu", "--gpus", gpu, *worker_args]
        env = dict(os.environ, **pool_env("gpu", gpu))
        procs.append(subprocess.Popen(argv, env=env, start_new_session=True))
        print(f"hetbatch: started gpu worker pid {procs[-1].pid} with CUDA_VISIBLE_DEVICES={gpu}", file=sys.stderr)

    def forward(signum: int, frame: FrameType | None) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        codes = []
        for gpu, proc in zip(gpus, procs, strict=True):
            codes.append(proc.wait())
            if codes[-1]:
                print(f"hetbatch: gpu worker {gpu} exited with status {codes[-1]}", file=sys.stderr)
        return max(codes)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
