"""Payloads through shared memory, for a producer and workers on one host.

A chunk that goes through Redis is copied four times: into Redis, out of it, and
through both sockets (about 0.4 core-seconds per 128 MB here, as much as the model
itself on a small MLP). Where the producer and a worker share a shared-memory folder
(``/dev/shm`` on the same host, or the same tmpfs mounted in two containers), the
producer writes the chunk's Arrow bytes to a file there and the task carries only the
file's name, like Triton's system shared-memory extension.

Which workers can read the file: each worker finds (or makes) the folder's *host
token*, a random name kept in the folder, and also consumes its queues' host queues
(``host_queue``). A producer that reads the same token, owned by its own user, sends
such jobs to the host queue while a worker of it is alive: no worker elsewhere ever
receives a name it cannot open. Everything else (the ledger, redelivery, the
reconciler) treats the host queue as any other queue.

Files are read, not mapped: a file cut short by someone else fails its job with a clear
error instead of a SIGBUS. The worker deletes a chunk's file when it stores the
chunk's result, and sweeps files older than their TTL.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import secrets
import stat
import time
from pathlib import Path

from hetbatch.producers.errors import JobLost, PayloadError

__all__ = ["HOST_SEP", "host_queue", "host_token", "payload_name", "read_payload", "sweep", "unlink", "write_payload"]

HOST_SEP = "@"
_TOKEN_FILE = "hetbatch-host"
_TOKEN = re.compile(r"[0-9a-f]{32}")
_PREFIX = "hetbatch-in-"
_NAME = re.compile(_PREFIX + r"[0-9a-f]{32}-\d{1,9}")


def host_queue(queue: str, token: str) -> str:
    """The queue only the workers sharing the folder with ``token`` consume."""
    return f"{queue}{HOST_SEP}{token[:16]}"


@functools.lru_cache(maxsize=8)
def _worker_token(folder: str) -> str | None:
    path = Path(folder) / _TOKEN_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return _read_token(path, owned=False)
    except OSError:
        return None  # no such folder, or not writable: no shared memory
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(16))
    return _read_token(path, owned=False)


def _read_token(path: Path, owned: bool) -> str | None:
    try:
        if owned and path.stat().st_uid != os.getuid():
            return None  # files this user writes there could be unreadable to its owner
        text = path.read_text().strip()
    except OSError:
        return None
    return text if _TOKEN.fullmatch(text) else None


def host_token(folder: str, *, create: bool = False) -> str | None:
    """The token of the shared-memory ``folder`` ("" turns it off): a worker makes it
    (``create``); a producer only reads one that a worker of its own user made."""
    if not folder:
        return None
    if create:
        return _worker_token(folder)
    return _read_token(Path(folder) / _TOKEN_FILE, owned=True)


def payload_name(job_id: str, chunk: int) -> str:
    return f"{_PREFIX}{job_id}-{chunk}"


def write_payload(folder: str, name: str, blob: bytes | memoryview) -> None:
    """Write a chunk's bytes (readable by this user only).

    Raises:
        OSError: it cannot, or it would leave less than a quarter of the folder free
            (a tmpfs is memory: others on the host need it too).
    """
    fs = os.statvfs(folder)
    if (fs.f_bavail * fs.f_frsize - len(blob)) * 4 < fs.f_blocks * fs.f_frsize:
        raise OSError(errno.ENOSPC, f"{folder} would be more than three quarters full")
    fd = os.open(Path(folder) / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb", buffering=0) as f:
        view = memoryview(blob)
        while view:
            view = view[f.write(view) or 0 :]


def read_payload(folder: str, name: str, job_id: str, max_bytes: int) -> bytes:
    """The bytes of a chunk's file.

    Raises:
        PayloadError: a name that is not a payload file's, not a regular file (a FIFO,
            device or directory), or a file too big to decode.
        JobLost: the file is gone (its TTL passed, or the host restarted).
    """
    if not _NAME.fullmatch(name):
        raise PayloadError(f"job {job_id}: {name!r} is not a shared-memory payload name")
    if not folder:
        raise PayloadError(f"job {job_id}: its input is in shared memory, and this worker has none (shm_dir is empty)")
    try:
        # O_NONBLOCK: opening a FIFO put there by someone else must not block the task
        # thread; O_NOFOLLOW: a symlink is refused, not followed.
        fd = os.open(Path(folder) / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise JobLost(job_id, f"input {name} is gone from {folder} (TTL passed or the host restarted)") from None
    except OSError as exc:
        raise PayloadError(f"job {job_id}: cannot open its input {name} in {folder}: {exc}") from exc
    info = os.fstat(fd)  # before fdopen, which raises IsADirectoryError on a directory
    if not stat.S_ISREG(info.st_mode):  # a FIFO, device or directory: never read
        os.close(fd)
        raise PayloadError(f"job {job_id}: input {name} in {folder} is not a regular file; refused")
    with os.fdopen(fd, "rb", buffering=0) as f:
        if info.st_size > max_bytes:
            raise PayloadError(f"job {job_id}: input {name} has {info.st_size} bytes, over the limit of {max_bytes}")
        try:
            data = f.read(info.st_size)
        except OSError as exc:
            raise PayloadError(f"job {job_id}: cannot read its input {name} in {folder}: {exc}") from exc
        return data if data is not None else b""


def unlink(folder: str, names: list[str]) -> None:
    if not folder:
        return
    for name in names:
        if _NAME.fullmatch(name):
            try:
                os.unlink(Path(folder) / name)
            except OSError:
                pass  # already gone (another execution stored the chunk first)


def sweep(folder: str, ttl_s: float) -> int:
    """Delete payload files older than ``ttl_s``; returns how many."""
    removed, cutoff = 0, time.time() - ttl_s
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        if not _NAME.fullmatch(entry.name):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(entry.path)
                removed += 1
        except OSError:
            pass
    return removed
