"""The record of a dataset run, kept beside its output so a later run can resume it.

One JSON document, rewritten whole after each committed part (written aside, then
moved over the old one: a rename on local disks, a server-side copy on object stores,
both of which show a reader the whole object or nothing): a reader sees
the previous version or the next, never half of one. A part is in ``parts`` only once
its output file (and its rejects file) is in place under the final name, so every part
listed is complete, and every part not listed is scored again by a resumed run.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from hetbatch.producers.errors import HetbatchError

__all__ = ["FORMAT", "Manifest", "ManifestConflict", "load", "save"]

FORMAT = 1


class ManifestConflict(HetbatchError):
    """A resumed run differs from the run that wrote the manifest (model, input or options)."""


@dataclass
class Manifest:
    """What a run scores, how, and which parts it has committed.

    Attributes:
        model: the resolved ``name@version``; a resumed run must score with the same.
        input: one fingerprint per input file (relative path, size, mtime, rows).
        options: the settings that shape the output (kept columns, part size, error policy).
        parts: committed part id -> {"output", "rows", "rejected", "rejects"}.
        complete: every part committed (and, for a single-file output, merged).
    """

    model: str
    input: list[dict[str, Any]]
    options: dict[str, Any]
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)
    complete: bool = False
    format: int = FORMAT
    started: float = field(default_factory=time.time)
    updated: float = 0.0

    def check_resumable(self, fresh: Manifest, where: str) -> None:
        """Refuse to continue this run as ``fresh`` when they would mix two answers.

        Raises:
            ManifestConflict: the model version, the input files or the options changed.
        """
        hint = f"; finish it with the same settings, or start again with --restart (or another --output than {where})"
        if fresh.model != self.model:
            raise ManifestConflict(f"the run at {where} was started with model {self.model}, not {fresh.model}{hint}")
        if fresh.input != self.input:
            before = {f["rel"]: f for f in self.input}
            now = {f["rel"]: f for f in fresh.input}
            changed = sorted(set(before) ^ set(now)) or sorted(k for k in now if now[k] != before.get(k))
            raise ManifestConflict(
                f"the input changed since the run at {where} started ({len(changed)} file(s), e.g. {changed[0]}){hint}"
            )
        if fresh.options != self.options:
            diff = sorted(k for k in {*fresh.options, *self.options} if fresh.options.get(k) != self.options.get(k))
            raise ManifestConflict(f"the run at {where} was started with other {', '.join(diff)}{hint}")

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> Manifest:
        """Raises: ManifestConflict: not a manifest this version of hetbatch wrote."""
        try:
            data = json.loads(raw)
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            return cls(**data)
        except (ValueError, TypeError) as exc:
            raise ManifestConflict(f"{where} is not a hetbatch manifest ({exc}); remove it or use --restart") from exc


def load(fs: pafs.FileSystem, path: str) -> Manifest | None:
    """The manifest at ``path``, or None when there is none."""
    try:
        with fs.open_input_stream(path) as stream:
            raw = stream.read()
    except (FileNotFoundError, pa.ArrowIOError):
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        raise
    return Manifest.from_json(raw, path)


def save(fs: pafs.FileSystem, path: str, manifest: Manifest) -> None:
    """Write ``manifest`` aside, then move it over the old one: a reader never sees half of it."""
    manifest.updated = time.time()
    directory, _, name = path.rpartition("/")
    aside = f"{directory}/.{name}.hetbatch-tmp"
    fs.create_dir(directory, recursive=True)
    with fs.open_output_stream(aside) as out:
        out.write(manifest.to_json())
    fs.move(aside, path)
