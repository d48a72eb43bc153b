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

Input files are read, not mapped: a file cut short by someone else fails its job with a
clear error instead of a SIGBUS in the worker. The worker deletes a chunk's file when it
stores the chunk's result, and sweeps files older than their TTL.

Results go back the same way: a worker that read a chunk's input from a file writes a
big result to ``result_name(job, chunk)`` in the same folder (``worker.results``) and
stores a reference to it under the result key (``parts.file_ref``). The client maps the
file and deletes it at once (the mapping outlives the name): the result's rows reach the
caller with no copy. Mapping is safe here as reading an input is not: the writer is a
worker the client trusts, which wrote the file whole and closed it, and no execution
rewrites it (``O_EXCL``), so only a process of the client's own user could cut it short.
A result file nobody reads is swept like an input file.
"""

from __future__ import annotations

import errno
import functools
import io
import mmap
import os
import re
import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np

from hetbatch.producers.errors import JobLost, PayloadError

__all__ = [
    "HOST_SEP",
    "host_queue",
    "host_token",
    "payload_name",
    "read_payload",
    "read_result",
    "result_name",
    "sweep",
    "unlink",
    "write_payload",
]

HOST_SEP = "@"
_TOKEN_FILE = "hetbatch-host"
_TOKEN = re.compile(r"[0-9a-f]{32}")
_PREFIX = "hetbatch-in-"
_OUT_PREFIX = "hetbatch-out-"
# Inputs and results: the only names this module reads, deletes or sweeps.
_NAME = re.compile(r"hetbatch-(?:in|out)-[0-9a-f]{32}-\d{1,9}")
_INPUT = re.compile(_PREFIX + r"[0-9a-f]{32}-\d{1,9}")


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


def result_name(job_id: str, chunk: int) -> str | None:
    """The file a result of ``(job_id, chunk)`` goes to; ``None`` for an id that cannot
    name one (not a client's 32 hex digits: an ensemble member's, say)."""
    name = f"{_OUT_PREFIX}{job_id}-{chunk}"
    return name if _NAME.fullmatch(name) else None


def write_payload(folder: str, name: str, blob: bytes | memoryview, *, exclusive: bool = False) -> None:
    """Write a chunk's bytes (readable by this user only).

    Args:
        exclusive: fail if the file exists (a result file another execution wrote, which
            a client may be reading) instead of replacing it.

    Raises:
        OSError: it cannot (``FileExistsError``: ``exclusive`` and the file exists), or it
            would leave less than a quarter of the folder free (a tmpfs is memory: others
            on the host need it too).
    """
    write_with(folder, name, len(blob), lambda f: f.write(blob), exclusive=exclusive)


class _WholeFile(io.FileIO):
    """A file whose ``write`` writes every byte (a plain one may write part and say so)."""

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        size = len(view)
        while view:
            view = view[super().write(view) or 0 :]
        return size


def write_with(
    folder: str, name: str, size: int, fill: Callable[[BinaryIO], object], *, exclusive: bool = False
) -> None:
    """``write_payload`` for bytes that ``fill`` writes itself (an Arrow stream written
    straight from a table's buffers, without an encoded copy); ``size``: their length."""
    fs = os.statvfs(folder)
    if (fs.f_bavail * fs.f_frsize - size) * 4 < fs.f_blocks * fs.f_frsize:
        raise OSError(errno.ENOSPC, f"{folder} would be more than three quarters full")
    how = os.O_EXCL if exclusive else os.O_TRUNC
    fd = os.open(Path(folder) / name, os.O_WRONLY | os.O_CREAT | how | os.O_NOFOLLOW, 0o600)
    try:
        with _WholeFile(fd, "wb") as f:
            fill(cast(BinaryIO, f))
    except OSError:
        unlink(folder, [name])  # ours, cut short (the folder filled up): never read
        raise


def read_payload(folder: str, name: str, job_id: str, max_bytes: int) -> memoryview:
    """The bytes of a chunk's input file.

    Raises:
        PayloadError: a name that is not a payload file's, not a regular file (a FIFO,
            device or directory), or a file too big to decode.
        JobLost: the file is gone (its TTL passed, or the host restarted).
    """
    if not _INPUT.fullmatch(name):
        raise PayloadError(f"job {job_id}: {name!r} is not a shared-memory payload name")
    if not folder:
        raise PayloadError(f"job {job_id}: its input is in shared memory, and this worker has none (shm_dir is empty)")
    return _read(folder, name, job_id, max_bytes, "input", "(TTL passed or the host restarted)")


def read_result(folder: str, job_id: str, unit: str, chunk: int, size: int) -> memoryview:
    """The ``size`` bytes of the result file of ``(unit, chunk)`` (``unit``: ``job_id`` or
    its pack's), mapped read-only and deleted: a result file is read once.

    Raises:
        PayloadError: the file is not a regular file, or not of ``size`` bytes; this side
            has no folder, or ``unit`` cannot name a result file.
        JobLost: the file is gone (read already, swept, on another host, or the host restarted).
    """
    name = result_name(unit, chunk)
    if name is None:
        raise PayloadError(f"job {job_id}: {unit!r} cannot name a shared-memory result file")
    if not folder:
        raise PayloadError(f"job {job_id}: its result is in shared memory, and this client has none (shm_dir is empty)")
    gone = "(read already, swept after its TTL, written on another host, or the host restarted)"
    f, found = _open(folder, name, job_id, size, "result", gone)  # a longer file is refused before mapping
    with f:
        if found != size:
            raise PayloadError(f"job {job_id}: result {name} in {folder} has {found} bytes, not the {size} stored")
        try:
            data = memoryview(mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)) if size else memoryview(b"")
        except OSError as exc:
            raise PayloadError(f"job {job_id}: cannot map its result {name} in {folder}: {exc}") from exc
    unlink(folder, [name])
    return data


def _open(folder: str, name: str, job_id: str, max_bytes: int, what: str, gone: str) -> tuple[io.FileIO, int]:
    """The file, opened to read, and its size (at most ``max_bytes``)."""
    try:
        # O_NONBLOCK: opening a FIFO put there by someone else must not block the task
        # thread; O_NOFOLLOW: a symlink is refused, not followed.
        fd = os.open(Path(folder) / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise JobLost(job_id, f"{what} {name} is gone from {folder} {gone}") from None
    except OSError as exc:
        raise PayloadError(f"job {job_id}: cannot open its {what} {name} in {folder}: {exc}") from exc
    info = os.fstat(fd)  # before FileIO, which raises IsADirectoryError on a directory
    if not stat.S_ISREG(info.st_mode):  # a FIFO, device or directory: never read
        os.close(fd)
        raise PayloadError(f"job {job_id}: {what} {name} in {folder} is not a regular file; refused")
    if info.st_size > max_bytes:
        os.close(fd)
        raise PayloadError(f"job {job_id}: {what} {name} has {info.st_size} bytes, over the limit of {max_bytes}")
    return io.FileIO(fd, "rb"), info.st_size


def _read(folder: str, name: str, job_id: str, max_bytes: int, what: str, gone: str) -> memoryview:
    f, size = _open(folder, name, job_id, max_bytes, what, gone)
    # Into a numpy array: numpy backs a big one with transparent huge pages, and faulting
    # in fresh memory, not the copy, is most of a read (600 MiB: 0.16 s, as bytes 0.27 s).
    buf, got = np.empty(size, np.uint8).data, 0
    with f:
        try:
            while got < size and (n := f.readinto(buf[got:])):
                got += n
        except OSError as exc:
            raise PayloadError(f"job {job_id}: cannot read its {what} {name} in {folder}: {exc}") from exc
    return buf[:got]  # short: the file was cut after it was opened (the decoder names the job)


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
    """Delete payload and result files older than ``ttl_s``; returns how many."""
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
