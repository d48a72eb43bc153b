"""Where a dataset run reads and writes: filesystems, input discovery and the part plan.

An input is a file, a directory (hive partitions included), a glob or a list of files,
on any filesystem pyarrow opens (local paths, ``s3://bucket/key``, ``gs://``, ...).
Discovery goes through ``pyarrow.dataset`` (which skips names starting with ``_`` or
``.``, the convention for markers and temporary files); each Parquet file is then cut
into parts of whole row groups, so a part can be read alone and resumed alone.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from hetbatch.producers.errors import ConfigError

__all__ = ["Part", "Source", "SourceFile", "discover", "filesystem", "plan_parts"]

_GLOB = set("*?[")


def filesystem(uri: str, storage: Mapping[str, str] | None = None) -> tuple[pafs.FileSystem, str]:
    """The filesystem of ``uri`` and the path inside it.

    ``s3://`` reads its endpoint from ``storage["endpoint_url"]``, else
    ``$AWS_ENDPOINT_URL_S3`` or ``$AWS_ENDPOINT_URL`` (an S3-compatible server such as
    MinIO or moto), and its credentials from ``storage`` (``access_key``,
    ``secret_key``, ``region``) or AWS's usual chain (``$AWS_ACCESS_KEY_ID``, profiles,
    instance roles).

    Raises:
        ConfigError: a scheme pyarrow cannot open.
    """
    options = dict(storage or {})
    if uri.startswith("s3://"):
        endpoint = (
            options.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        )
        kwargs: dict[str, Any] = {
            "access_key": options.get("access_key"),
            "secret_key": options.get("secret_key"),
            "region": options.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        }
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
        return pafs.S3FileSystem(**{k: v for k, v in kwargs.items() if v is not None}), uri[len("s3://") :]
    if "://" in uri and not uri.startswith("file://"):
        try:
            fs, path = pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ConfigError(f"cannot open {uri!r}: {exc}; use a local path or s3://bucket/key") from exc
        return fs, path
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), os.path.abspath(path)


@dataclass(frozen=True)
class SourceFile:
    """One input file: where it is, what it holds, and what identifies this version of it."""

    path: str
    rel: str
    size: int
    mtime_ns: int
    rows: int
    row_groups: tuple[int, ...]

    def fingerprint(self) -> dict[str, Any]:
        return {"rel": self.rel, "size": self.size, "mtime_ns": self.mtime_ns, "rows": self.rows}


@dataclass(frozen=True)
class Source:
    """A discovered input dataset."""

    fs: pafs.FileSystem
    root: str
    files: tuple[SourceFile, ...]
    schema: pa.Schema
    partitions: tuple[str, ...]

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)


@dataclass(frozen=True)
class Part:
    """Whole row groups of one input file, scored and committed as one output file."""

    id: str
    file: SourceFile
    row_groups: tuple[int, ...]
    first_row: int
    rows: int
    out_rel: str


def _listing(fs: pafs.FileSystem, inputs: Sequence[str]) -> tuple[str, list[str]]:
    """(root, files) of the input forms: one file, a directory, a glob, a list of files."""
    if len(inputs) == 1 and not _GLOB & set(inputs[0]):
        info = fs.get_file_info(inputs[0])
        if info.type == pafs.FileType.NotFound:
            raise ConfigError(f"input {inputs[0]!r} does not exist; give a file, a directory or a glob")
        if info.type == pafs.FileType.Directory:
            return inputs[0].rstrip("/"), []
        return posixpath.dirname(inputs[0]), [inputs[0]]
    files: list[str] = []
    for pattern in inputs:
        if not _GLOB & set(pattern):
            files.append(pattern)
            continue
        base = pattern[: min(pattern.index(c) for c in _GLOB if c in pattern)].rpartition("/")[0] or "/"
        found = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        files += sorted(i.path for i in found if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, pattern))
    if not files:
        raise ConfigError(f"no input file matches {', '.join(inputs)}")
    root = (
        posixpath.commonpath([posixpath.dirname(f) for f in files]) if len(files) > 1 else posixpath.dirname(files[0])
    )
    return root, files


def discover(fs: pafs.FileSystem, inputs: Sequence[str]) -> Source:
    """List the input's Parquet files (hive partition folders read as columns).

    Raises:
        ConfigError: nothing there, or a file pyarrow cannot read as Parquet.
    """
    root, listed = _listing(fs, inputs)
    try:
        dataset = ds.dataset(
            listed or root, filesystem=fs, format="parquet", partitioning="hive", partition_base_dir=root or None
        )
        files = sorted(dataset.files)
        if not files:
            raise ConfigError(f"no Parquet file under {root!r}")
        infos = fs.get_file_info(files)
        found = []
        for info in infos:
            meta = pq.read_metadata(info.path, filesystem=fs)
            groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
            mtime = info.mtime_ns if info.mtime_ns is not None else 0
            rel = posixpath.relpath(info.path, root) if root else info.path
            found.append(SourceFile(info.path, rel, int(info.size or 0), int(mtime), meta.num_rows, groups))
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError(f"cannot read the input {', '.join(inputs)}: {exc}") from exc
    partitions = tuple(n for n in dataset.schema.names if n not in pq.read_schema(files[0], filesystem=fs).names)
    return Source(fs, root, tuple(found), dataset.schema, partitions)


def _out_name(rel: str, index: int, count: int) -> str:
    stem = rel[: -len(".parquet")] if rel.endswith(".parquet") else rel
    return f"{stem}.parquet" if count == 1 else f"{stem}-{index:05d}.parquet"


def plan_parts(source: Source, part_rows: int) -> list[Part]:
    """Cut each file into parts of whole row groups of about ``part_rows`` rows or more.

    A file smaller than ``part_rows`` is one part, written under the same relative path
    as its input (hive folders kept); a larger one is several, ``<name>-00000.parquet``
    and on. A part never splits a row group: that keeps every part's read independent.
    """
    parts: list[Part] = []
    for f in source.files:
        groups: list[list[int]] = [[]]
        rows_in = 0
        for i, n in enumerate(f.row_groups):
            if groups[-1] and rows_in >= part_rows:
                groups.append([])
                rows_in = 0
            groups[-1].append(i)
            rows_in += n
        first = 0
        for k, members in enumerate(groups):
            rows = sum(f.row_groups[i] for i in members)
            part_id = f.rel if len(groups) == 1 else f"{f.rel}#{k}"
            parts.append(Part(part_id, f, tuple(members), first, rows, _out_name(f.rel, k, len(groups))))
            first += rows
    return parts
