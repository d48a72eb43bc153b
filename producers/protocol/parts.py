"""Results stored in parts: a chunk's result over the worker's ``max_result_bytes`` is
cut into parts instead of failing (a job's output size is often not the client's to predict).

The worker stores the encoded result's bytes as N parts under ``Keys.result_part(job,
chunk, i)`` and, under the chunk's own result key, a small manifest: tag ``M`` and the
JSON list of the parts' sizes. Parts and manifest are written in one script call
(``lua/results_store.lua``): the manifest, the result key every reader and the ledger
take as "answered", is never there without its parts, and they share one TTL.
A client reads the parts in order, checks each against the manifest, and joins them back
into the one result the worker encoded (``wire.decode_result`` reads it as usual).
Nothing here trusts the manifest: a part missing, of another size than listed, or a
manifest over the bounds below raises a typed error naming the job.

A result in a shared-memory file (``shm.result_name``: the chunk's input came that way)
is stored as a *file reference* instead: tag ``F`` and ``{"bytes": size}``. The size is
the length check a reader holds the file to; the name is derived from the job, never read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import cast

from hetbatch.producers.errors import JobFailed, JobLost, RemoteError
from hetbatch.producers.protocol.keys import Keys

__all__ = [
    "FILE_TAG",
    "MAX_FILE_BYTES",
    "MAX_PARTS",
    "MAX_PART_BYTES",
    "READ_BYTES",
    "TAG",
    "file_ref",
    "groups",
    "is_file_ref",
    "is_manifest",
    "join",
    "part_keys",
    "read_file_ref",
    "read_manifest",
    "split",
]

TAG = b"M"  # beside wire's result tags A (Arrow), E (error) and P (pack)
MAX_PART_BYTES = 512 * 1024 * 1024
"""Largest part a manifest may list: a Redis string holds 512 MB at most."""
MAX_PARTS = 65_536
"""Most parts a manifest may list (a 1 MiB part size still allows 64 GiB per chunk)."""
READ_BYTES = 256 * 1024 * 1024
"""Most part bytes a reader asks for in one command."""
_MAX_MANIFEST_BYTES = 1 << 20
FILE_TAG = b"F"
MAX_FILE_BYTES = MAX_PARTS * 1024 * 1024
"""Largest result file a reference may name (as much as a manifest of 1 MiB parts)."""
_MAX_REF_BYTES = 64


def split(data: bytes | memoryview, part_bytes: int) -> tuple[bytes, list[memoryview]]:
    """``data`` as a manifest and its parts of at most ``part_bytes`` each (views, no copy).

    Raises:
        ValueError: ``part_bytes`` is not positive.
    """
    if part_bytes <= 0:
        raise ValueError(f"part_bytes must be positive, not {part_bytes}")
    view = memoryview(data).cast("B")
    parts = [view[at : at + part_bytes] for at in range(0, len(view), part_bytes)]
    return TAG + json.dumps([len(p) for p in parts]).encode(), parts


def is_manifest(value: bytes | memoryview | None) -> bool:
    """Whether a stored result is a manifest of parts (not the result itself)."""
    return value is not None and value[:1] == TAG


def _corrupt(job_id: str, chunk: int, problem: str) -> JobFailed:
    return JobFailed(job_id, RemoteError("PayloadError", f"chunk {chunk}: stored result manifest {problem}"))


def read_manifest(job_id: str, chunk: int, value: bytes | memoryview) -> list[int]:
    """The part sizes a manifest lists, checked against the bounds.

    Raises:
        JobFailed: the manifest is corrupt or over the bounds (remote type PayloadError).
    """
    if not is_manifest(value) or len(value) > _MAX_MANIFEST_BYTES:
        raise _corrupt(job_id, chunk, f"is not a manifest ({len(value)} bytes)")
    try:
        sizes = json.loads(bytes(value[1:]))
    except (ValueError, RecursionError) as exc:
        raise _corrupt(job_id, chunk, f"is not JSON: {exc}") from exc
    if not isinstance(sizes, list) or not 1 <= len(sizes) <= MAX_PARTS:
        raise _corrupt(job_id, chunk, f"must list 1 to {MAX_PARTS} part sizes")
    # bool is an int subclass: true would read as a 1-byte part
    if not all(type(n) is int and 0 < n <= MAX_PART_BYTES for n in sizes):
        raise _corrupt(job_id, chunk, f"lists a part size that is not an int in 1..{MAX_PART_BYTES}")
    return sizes


def part_keys(keys: Keys, unit: str, chunk: int, count: int) -> list[str]:
    """The keys of a chunk's ``count`` parts, in order (``unit``: the job's id or its pack's)."""
    return [keys.result_part(unit, chunk, i) for i in range(count)]


def groups(sizes: Sequence[int], budget_bytes: int = READ_BYTES) -> list[range]:
    """Part indexes to read together (one MGET each), at most ``budget_bytes`` listed per
    group (one part at least), so a reply never holds much more than one part's worth."""
    out, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > budget_bytes:
            out.append(range(start, i))
            start, total = i, 0
        total += size
    out.append(range(start, len(sizes)))
    return out


def join(job_id: str, chunk: int, sizes: Sequence[int], parts: Sequence[bytes | None]) -> bytes:
    """The result the parts make, in order, each checked against its listed size.

    Raises:
        JobLost: a part is gone (its TTL passed, or Redis lost it).
        JobFailed: a part's size is not the one listed (remote type PayloadError).
    """
    if len(parts) != len(sizes):
        raise _corrupt(job_id, chunk, f"lists {len(sizes)} parts; {len(parts)} read")
    for i, (size, part) in enumerate(zip(sizes, parts, strict=True)):
        if part is None:
            raise JobLost(job_id, f"part {i} of {len(sizes)} of chunk {chunk}'s result is gone (TTL passed?)")
        if len(part) != size:
            raise _corrupt(job_id, chunk, f"lists part {i} as {size} bytes; it holds {len(part)}")
    if parts and is_manifest(parts[0]):  # a manifest of manifests would be read again and again
        raise _corrupt(job_id, chunk, "lists parts that hold another manifest")
    return b"".join(cast(Sequence[bytes], parts))  # one copy, into the buffer the result is read from


def file_ref(size: int) -> bytes:
    """What is stored under a chunk's result key when its ``size`` result bytes are in its file."""
    return FILE_TAG + json.dumps({"bytes": size}).encode()


def is_file_ref(value: bytes | memoryview | None) -> bool:
    """Whether a stored result is a reference to a shared-memory result file."""
    return value is not None and value[:1] == FILE_TAG


def read_file_ref(job_id: str, chunk: int, value: bytes | memoryview) -> int:
    """The size a file reference holds its file to, checked against the bounds.

    Raises:
        JobFailed: the reference is corrupt or over the bounds (remote type PayloadError).
    """
    problem = f"is not a file reference ({len(value)} bytes)"
    if is_file_ref(value) and len(value) <= _MAX_REF_BYTES:
        try:
            ref = json.loads(bytes(value[1:]))
        except (ValueError, RecursionError):
            ref = None
        size = ref.get("bytes") if isinstance(ref, dict) else None
        # bool is an int subclass: true would read as a 1-byte file
        if type(size) is int and 0 < size <= MAX_FILE_BYTES:
            return size
        problem = f"is not a file reference of 1..{MAX_FILE_BYTES} bytes: {bytes(value[:_MAX_REF_BYTES])!r}"
    raise JobFailed(job_id, RemoteError("PayloadError", f"chunk {chunk}: stored result {problem}"))
