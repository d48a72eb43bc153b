"""Payload-reference traps for tests/kit/hostile.py: what a job's own input key can hold
besides Arrow bytes, and what its payload file name can point at besides a regular file
(FIFOs, folders, links, devices, sockets, files too big, empty or random)."""

from __future__ import annotations

import os
import random
import socket
import stat
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import redis

__all__ = ["key_traps", "shm_traps"]


def shm_traps(folder: Path, victim_files: list[str], rng: random.Random) -> dict[str, Any]:
    """Makers by kind: each creates its trap at a path (the job's own payload file name)."""

    def fifo(path: Path, x: np.ndarray) -> None:
        os.mkfifo(path, 0o600)

    def directory(path: Path, x: np.ndarray) -> None:
        path.mkdir()

    def link_victim(path: Path, x: np.ndarray) -> None:
        path.symlink_to(folder / rng.choice(victim_files))

    def link_etc(path: Path, x: np.ndarray) -> None:
        path.symlink_to("/etc/passwd")

    def device(path: Path, x: np.ndarray) -> None:
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero: endless bytes

    def sock(path: Path, x: np.ndarray) -> None:
        # AF_UNIX paths are short (108 bytes): bind in place when it fits, else bind in the same
        # folder under a short relative name and move it (a rename never crosses devices there).
        with socket.socket(socket.AF_UNIX) as s:
            if len(str(path)) < 100:
                s.bind(str(path))
                return
            here = os.getcwd()
            os.chdir(path.parent)
            try:
                short = f"hb-{uuid.uuid4().hex[:12]}.sock"
                s.bind(short)
                os.rename(short, path)
            finally:
                os.chdir(here)

    def sparse(path: Path, x: np.ndarray) -> None:
        with open(path, "wb") as f:
            f.truncate(1 << 30)

    def random_bytes(path: Path, x: np.ndarray) -> None:
        path.write_bytes(rng.randbytes(300))

    def empty(path: Path, x: np.ndarray) -> None:
        path.write_bytes(b"")

    def absent(path: Path, x: np.ndarray) -> None:
        return None

    makers = dict(fifo=fifo, folder=directory, link_victim=link_victim, link_etc=link_etc, socket=sock)
    makers |= dict(sparse=sparse, random=random_bytes, empty=empty, absent=absent)
    if os.geteuid() == 0:
        makers["device"] = device
    return makers


def key_traps(r: redis.Redis, limit: int, rng: random.Random, *, huge: bool) -> dict[str, Any]:
    """Makers by kind: each sets what the job's own input key holds (``limit``: the worker's max payload bytes)."""
    out = {
        "hash": lambda key, x: r.hset(key, "a", "b"),
        "list": lambda key, x: r.rpush(key, "a"),
        "random": lambda key, x: r.set(key, rng.randbytes(200), ex=3600),
        "absent": lambda key, x: None,
    }
    if huge:  # a 17 MiB value, over the worker's limit: refused before it is read whole
        out["huge"] = lambda key, x: r.setrange(key, limit + (1 << 20), b"\x00")
    return out
