"""A dataset run: read parts, score them through the queue, commit each part atomically.

The loop keeps ``in_flight`` jobs out across part boundaries (``etl.scored``), so a
part's end does not drain the pipeline. A part's output (and its rejected rows) are
written under a hidden name beside the final one, moved into place when the part's
last batch is written, and only then recorded in the manifest: a SIGKILL at any point
leaves committed parts whole and the rest to a resumed run.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from hetbatch.producers.client import Client
from hetbatch.producers.dataset import manifest as mf
from hetbatch.producers.dataset.progress import Progress, ProgressMode, RunSummary
from hetbatch.producers.dataset.screen import ERROR_COLUMNS, screen
from hetbatch.producers.dataset.source import Part, Source, discover, filesystem, plan_parts
from hetbatch.producers.errors import ConfigError, SchemaMismatch
from hetbatch.producers.etl import attach, check_keep, output_schema, scored
from hetbatch.producers.protocol.schema import CastRule

__all__ = ["MANIFEST_NAME", "SUCCESS_NAME", "RowRejected", "RunOptions", "run_dataset"]

MANIFEST_NAME = "_hetbatch_manifest.json"
SUCCESS_NAME = "_SUCCESS"  # the Hadoop/Spark marker of a complete output folder
_ASIDE = ".hetbatch-tmp"
_WHOLE_GROUP_BYTES = 96 << 20  # decoded size, as the file's metadata states it


class RowRejected(SchemaMismatch):
    """A row the model cannot take, under ``--on-error fail``: names the file, row and column."""

    def __init__(self, file: str, row: int, column: str, kind: str, message: str) -> None:
        super().__init__(
            f"{file}: row {row:,} (0-based), column {column!r}: {kind}: {message}; fix the row, or pass "
            "--on-error quarantine --rejects DIR to set such rows aside and score the rest"
        )
        self.file, self.row, self.kind = file, row, kind
        self.column = column


@dataclass(frozen=True)
class RunOptions:
    """A dataset run's settings (the ``hetbatch run`` flags).

    Attributes:
        model: ``name`` or ``name@version``; resolved once, at the start.
        inputs: one file, one directory, globs or a list of files.
        output: a folder (parts mirror the input's files), or a ``.parquet`` file when
            the input is one file.
        keep: input columns copied next to the outputs (partition columns stay in the path).
        batch_rows: rows per job. part_rows: rows per output part of a large file (whole row groups).
        in_flight: jobs out at once. timeout_s: seconds to wait for one job.
        on_error: ``fail`` at the first bad row, or ``quarantine`` it into ``rejects``.
        restart: forget an earlier run's manifest and score everything again.
        storage: filesystem options (``endpoint_url``, ``access_key``, ``secret_key``, ``region``).
        events: called with (event, part id) at ``batch``, ``staged``, ``moved`` and
            ``committed``; for observers and fault-injection tests.
    """

    model: str
    inputs: tuple[str, ...]
    output: str
    keep: tuple[str, ...] = ()
    batch_rows: int = 65_536
    part_rows: int = 1_048_576
    in_flight: int = 4
    timeout_s: float = 600.0
    cast: CastRule = "safe"
    on_error: Literal["fail", "quarantine"] = "fail"
    rejects: str | None = None
    restart: bool = False
    progress: ProgressMode = "bar"
    storage: Mapping[str, str] = field(default_factory=dict)
    events: Callable[[str, str], None] | None = None


class _Sink:
    """One Parquet file written under a hidden name, then moved to its final name."""

    def __init__(self, fs: pafs.FileSystem, final: str, schema: pa.Schema) -> None:
        directory, _, name = final.rpartition("/")
        self.fs, self.final, self.aside = fs, final, f"{directory}/.{name}{_ASIDE}"
        fs.create_dir(directory, recursive=True)
        self.writer = pq.ParquetWriter(self.aside, schema, filesystem=fs)
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table)
        self.rows += table.num_rows

    def stage(self) -> None:
        self.writer.close()

    def move(self) -> None:
        self.fs.move(self.aside, self.final)

    def discard(self) -> None:
        try:
            self.writer.close()
            self.fs.delete_file(self.aside)
        except (OSError, pa.ArrowException):
            pass  # best effort: a resumed run deletes what is left under a hidden name


@dataclass
class _Tag:
    """What travels beside a job: where its rows go."""

    part: Part
    rows: int = 0
    kept: pa.Table | None = None
    rejects: pa.Table | None = None
    end: bool = False


@dataclass
class _Layout:
    """Where parts, rejects and the manifest go, and the file a single-file run merges into."""

    fs: pafs.FileSystem
    root: str
    rejects_fs: pafs.FileSystem | None
    rejects_root: str | None
    merge_into: str | None

    @property
    def manifest(self) -> str:
        return f"{self.root}/{MANIFEST_NAME}"


def _layout(opts: RunOptions, source: Source) -> _Layout:
    fs, out = filesystem(opts.output, opts.storage)
    out = out.rstrip("/")
    rejects_fs, rejects_root = filesystem(opts.rejects, opts.storage) if opts.rejects else (None, None)
    if opts.on_error == "quarantine" and rejects_root is None:
        raise ConfigError("--on-error quarantine needs --rejects DIR: the folder that receives the rejected rows")
    if out.endswith(".parquet"):
        if len(source.files) != 1 or source.partitions:
            raise ConfigError(f"{opts.output}: the output of a dataset of {len(source.files)} files is a folder")
        directory, _, name = out.rpartition("/")
        return _Layout(fs, f"{directory}/.{name}.parts", rejects_fs, rejects_root, out)
    return _Layout(fs, out, rejects_fs, rejects_root, None)


def _leftovers(layout: _Layout) -> set[str]:
    """Delete files an interrupted run left under hidden names; return the final paths present."""
    present: set[str] = set()
    for fs, root in ((layout.fs, layout.root), (layout.rejects_fs, layout.rejects_root)):
        if fs is None or root is None:
            continue
        found = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        for info in found:
            if info.type != pafs.FileType.File:
                continue
            directory, _, name = info.path.rpartition("/")
            if name.endswith(_ASIDE):
                fs.delete_file(info.path)
                present.add(f"{directory}/{name[1 : -len(_ASIDE)]}")
            else:
                present.add(info.path)
    return present


def _merge(layout: _Layout, parts: list[Part], schema: pa.Schema) -> None:
    """A single-file run: copy the committed parts, in order, into the output file."""
    assert layout.merge_into is not None
    sink = _Sink(layout.fs, layout.merge_into, schema)
    try:
        for part in parts:
            with layout.fs.open_input_file(f"{layout.root}/{part.out_rel}") as f:
                pf = pq.ParquetFile(f)
                for i in range(pf.num_row_groups):
                    sink.write(pf.read_row_group(i))
        sink.stage()
        sink.move()
    except BaseException:
        sink.discard()
        raise
    layout.fs.delete_dir(layout.root)


def _needed(spec: Any, keep: list[str], available: list[str]) -> list[str]:
    """The file columns a run reads: the model's inputs (or their feature columns) and the kept ones."""
    names: list[str] = []
    for t in spec.inputs:
        names += [t.name] if t.name in available or not t.columns else list(t.columns)
    return [c for c in dict.fromkeys([*names, *keep]) if c in available]


def _items(
    opts: RunOptions, spec: Any, source: Source, parts: list[Part], columns: list[str] | None, keep: list[str]
) -> Generator[tuple[_Tag, Any], None, None]:
    """Each part's screened batches, then an end marker: ``(tag, model inputs or None)``."""
    for part in parts:
        row = part.first_row
        if part.row_groups:
            with source.fs.open_input_file(part.file.path) as f:
                for batch in _batches(pq.ParquetFile(f, pre_buffer=False), part.row_groups, columns, opts.batch_rows):
                    yield _screened(opts, spec, part, batch, row, keep)
                    row += batch.num_rows
        yield _Tag(part, end=True), None


def _batches(
    pf: pq.ParquetFile, groups: tuple[int, ...], columns: list[str] | None, rows: int
) -> Generator[pa.RecordBatch, None, None]:
    """A part's rows in batches of ``rows`` (the last may be shorter), across row groups.

    A row group of up to _WHOLE_GROUP_BYTES is read whole: ``iter_batches`` holds about
    three times as much Arrow memory for the same rows at the same speed. A bigger one streams.
    A batch is copied only where it spans two groups."""
    meta = pf.metadata
    held: list[pa.Table] = []
    have = 0
    for i in groups:
        if meta.row_group(i).total_byte_size <= _WHOLE_GROUP_BYTES:
            pieces = [pf.read_row_group(i, columns=columns)]
        else:
            pieces = [pa.Table.from_batches([b]) for b in pf.iter_batches(rows, row_groups=[i], columns=columns)]
        for piece in pieces:
            held.append(piece)
            have += piece.num_rows
            while have >= rows:
                joined = pa.concat_tables(held)
                yield from joined.slice(0, rows).combine_chunks().to_batches()
                have -= rows
                held = [joined.slice(rows)] if have else []  # an empty slice would keep the group alive
    if have:
        yield from pa.concat_tables(held).combine_chunks().to_batches()


def _screened(
    opts: RunOptions, spec: Any, part: Part, batch: pa.RecordBatch, row: int, keep: list[str]
) -> tuple[_Tag, Any]:
    quarantine = opts.on_error == "quarantine"
    try:
        s = screen(batch, spec.inputs, nan=getattr(spec, "nan", "pass"), cast=opts.cast, lossy_rows=quarantine)
    except SchemaMismatch as exc:
        raise SchemaMismatch(f"{part.file.rel}: {exc}") from exc
    kept = pa.Table.from_batches([batch.select(keep)]) if keep else None
    rejects = None
    if s.rejected:
        if not quarantine:
            first = int(s.bad_rows[0])
            raise RowRejected(part.file.rel, row + first, s.columns[0], s.kinds[0], s.messages[0])
        kept = kept.filter(pa.array(s.good)) if kept is not None else None
        bad = pa.Table.from_batches([batch]).take(pa.array(s.bad_rows))
        errors = [pa.array(row + s.bad_rows, pa.int64()), pa.array(s.kinds), pa.array(s.columns), pa.array(s.messages)]
        rejects = pa.Table.from_arrays([*bad.columns, *errors], names=[*bad.column_names, *ERROR_COLUMNS])
    data = s.inputs if s.rejected < batch.num_rows else None
    return _Tag(part, batch.num_rows, kept, rejects), data


def _commit(
    layout: _Layout, manifest: mf.Manifest, part: Part, sinks: dict[str, _Sink], notify: Callable[[str, str], None]
) -> None:
    """Move the part's files into place, then record it: the order that makes a kill at any point safe."""
    out, rejects = sinks.pop("out"), sinks.pop("rejects", None)
    out.stage()
    if rejects is not None:
        rejects.stage()
    notify("staged", part.id)
    if rejects is not None:  # before the output: a committed-looking part never lacks its rejects
        rejects.move()
    out.move()
    notify("moved", part.id)
    manifest.parts[part.id] = {
        "output": part.out_rel,
        "rows": part.rows,
        "rejected": rejects.rows if rejects is not None else 0,
        "rejects": part.out_rel if rejects is not None else None,
    }
    mf.save(layout.fs, layout.manifest, manifest)
    notify("committed", part.id)


def _start(opts: RunOptions, client: Client) -> tuple[Source, _Layout, Any, list[str], list[Part], mf.Manifest]:
    """Discover the input, check the options and settle what an earlier run left."""
    fs, path = filesystem(opts.inputs[0], opts.storage)
    source = discover(fs, [path, *(filesystem(i, opts.storage)[1] for i in opts.inputs[1:])])
    layout = _layout(opts, source)
    spec = client.registry.get(opts.model)  # not the client's cache: a run resolves "latest" now
    file_columns = [n for n in source.schema.names if n not in source.partitions]
    keep = [c for c in check_keep(opts.keep, source.schema.names, spec.outputs, opts.inputs[0]) if c in file_columns]
    parts = plan_parts(source, opts.part_rows)
    fresh = mf.Manifest(
        model=spec.ref,
        input=[f.fingerprint() for f in source.files],
        options={"keep": list(opts.keep), "part_rows": opts.part_rows, "on_error": opts.on_error, "cast": opts.cast},
    )
    old = None if opts.restart else mf.load(layout.fs, layout.manifest)
    manifest = fresh
    if old is not None and old.parts:  # with nothing committed there is nothing to protect
        old.check_resumable(fresh, opts.output)
        manifest = old
    return source, layout, spec, keep, parts, manifest


def run_dataset(opts: RunOptions, client: Client) -> RunSummary:
    """Score a dataset through ``client``; resume an interrupted run of the same settings.

    Raises:
        ConfigError: bad paths or options. ManifestConflict: the model version, the input
        or the options changed under a resumed run. RowRejected: a bad row under
        ``on_error="fail"``. SchemaMismatch, JobFailed, JobTimeout: as ``Client.submit``.
    """
    source, layout, spec, keep, parts, manifest = _start(opts, client)
    success = f"{layout.root}/{SUCCESS_NAME}"
    todo = [p for p in parts if p.id not in manifest.parts]
    present: set[str] = set()
    if not manifest.complete:
        if layout.merge_into is None and layout.fs.get_file_info(success).type == pafs.FileType.File:
            layout.fs.delete_file(success)  # a restarted run: the old output is no longer complete
        present = _leftovers(layout)
        mf.save(layout.fs, layout.manifest, manifest)
    rescored = [p for p in todo if f"{layout.root}/{p.out_rel}" in present]
    out_schema = pa.schema([*(source.schema.field(c) for c in keep), *output_schema(client, spec.ref)])
    done_rows = sum(int(p["rows"]) for p in manifest.parts.values())
    done_rejected = sum(int(p["rejected"]) for p in manifest.parts.values())
    progress = Progress(opts.progress, label=spec.ref)
    progress.start(source.rows, done_rows, len(parts), len(parts) - len(todo), done_rejected)
    file_columns = [n for n in source.schema.names if n not in source.partitions]
    columns = None if opts.on_error == "quarantine" else _needed(spec, keep, file_columns)
    sinks: dict[str, _Sink] = {}
    notify = opts.events or (lambda event, part: None)
    items = _items(opts, spec, source, todo, columns, keep)
    stream = scored(client, spec.ref, items, max_in_flight=opts.in_flight, timeout_s=opts.timeout_s, cast=opts.cast)
    try:
        for tag, result in stream:
            part = tag.part
            if "out" not in sinks:
                sinks["out"] = _Sink(layout.fs, f"{layout.root}/{part.out_rel}", out_schema)
            if tag.end:
                _commit(layout, manifest, part, sinks, notify)
                progress.part_done()
                continue
            if result is not None:
                sinks["out"].write(attach(tag.kept, result))
            if tag.rejects is not None:
                if "rejects" not in sinks:
                    assert layout.rejects_fs is not None
                    final = f"{layout.rejects_root}/{part.out_rel}"
                    sinks["rejects"] = _Sink(layout.rejects_fs, final, tag.rejects.schema)
                sinks["rejects"].write(tag.rejects)
            progress.advance(tag.rows, tag.rejects.num_rows if tag.rejects is not None else 0)
            notify("batch", part.id)
        if not manifest.complete:
            if layout.merge_into is not None:
                _merge(layout, parts, out_schema)
            else:
                manifest.complete = True
                mf.save(layout.fs, layout.manifest, manifest)
                with layout.fs.open_output_stream(success):
                    pass
    except BaseException:
        stream.close()  # its jobs still out are deleted from Redis
        items.close()
        for sink in sinks.values():
            sink.discard()
        progress.abort()
        raise
    rejected_now = progress.rejected - done_rejected
    summary = RunSummary(
        model=spec.ref,
        output=opts.output,
        rejects=opts.rejects,
        rows_total=source.rows,
        rows_scored=progress.rows_run - rejected_now,
        rows_rejected=progress.rejected,
        rows_skipped=done_rows,
        parts_total=len(parts),
        parts_scored=len(todo),
        parts_skipped=len(parts) - len(todo),
        parts_rescored=len(rescored),
        seconds=round(progress.elapsed_s, 3),
        rows_per_s=round(progress.rows_run / progress.elapsed_s, 1) if progress.elapsed_s > 0 else 0.0,
    )
    progress.finish(summary)
    return summary
