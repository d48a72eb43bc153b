"""Progress of a dataset run: a bar for people, JSON lines for orchestrators.

``--json`` prints one object per line on stdout, about once a second and at the end::

    {"event": "progress", "rows_done": 1200000, "rows_total": 10000000, "rows_per_s": 412000.0,
     "eta_s": 21.4, "rejected": 12, "parts_done": 3, "parts_total": 20, "elapsed_s": 2.9}
    {"event": "summary", ...every field of RunSummary...}

``rows_done`` and ``parts_done`` count parts committed by earlier runs too; ``rows_per_s``
and ``eta_s`` are measured on this run's own work.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal, TextIO

__all__ = ["Progress", "ProgressMode", "RunSummary"]

ProgressMode = Literal["bar", "json", "quiet"]


@dataclass(frozen=True)
class RunSummary:
    """What a dataset run did.

    Attributes:
        model: the resolved ``name@version``.
        output: where the output is.
        rejects: where rejected rows went (None unless quarantining).
        rows_total: rows in the input.
        rows_scored: rows sent to the model by this run.
        rows_rejected: rows set aside, by this run and the runs it resumed.
        rows_skipped: rows of parts committed by earlier runs, not read again.
        parts_total, parts_scored, parts_skipped: the same, in parts.
        parts_rescored: parts this run scored again because an earlier run had started
            them without committing (the extra work a resume costs).
        seconds: wall time of this run.
        rows_per_s: rows read and scored (or rejected) per second by this run.
    """

    model: str
    output: str
    rejects: str | None
    rows_total: int
    rows_scored: int
    rows_rejected: int
    rows_skipped: int
    parts_total: int
    parts_scored: int
    parts_skipped: int
    parts_rescored: int
    seconds: float
    rows_per_s: float

    def describe(self) -> str:
        """A few lines for people."""
        lines = [
            f"scored {self.rows_scored:,} rows with {self.model} in {self.seconds:.1f} s "
            f"({self.rows_per_s:,.0f} rows/s) -> {self.output}",
            f"parts: {self.parts_scored} scored, {self.parts_skipped} already committed, "
            f"{self.parts_rescored} scored again after an interrupted run; {self.parts_total} in all",
        ]
        if self.rows_rejected or self.rejects:
            lines.append(f"rejected rows: {self.rows_rejected:,} -> {self.rejects}")
        return "\n".join(lines)


class Progress:
    """Counts a run's rows and parts and shows them in the chosen mode."""

    def __init__(self, mode: ProgressMode, *, label: str = "", interval_s: float = 1.0, out: TextIO | None = None):
        self.mode = mode
        self.label = label
        self.interval_s = interval_s
        self.out = out or (sys.stdout if mode == "json" else sys.stderr)
        self.rows_total = self.rows_done = self.rows_run = self.rejected = 0
        self.parts_total = self.parts_done = 0
        self._started = time.perf_counter()
        self._last = 0.0
        self._bar: Any = None

    def start(self, rows_total: int, rows_done: int, parts_total: int, parts_done: int, rejected: int) -> None:
        self.rows_total, self.rows_done = rows_total, rows_done
        self.parts_total, self.parts_done, self.rejected = parts_total, parts_done, rejected
        self._started = time.perf_counter()
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(
                total=rows_total, initial=rows_done, unit="rows", unit_scale=True, desc=self.label, file=self.out
            )
            self._postfix()

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self._started

    def advance(self, rows: int, rejected: int = 0) -> None:
        """``rows`` more rows done (scored or rejected), ``rejected`` of them set aside."""
        self.rows_done += rows
        self.rows_run += rows
        self.rejected += rejected
        if self._bar is not None:
            self._bar.update(rows)
            if rejected:
                self._postfix()
        elif self.mode == "json" and time.perf_counter() - self._last >= self.interval_s:
            self.emit()

    def part_done(self) -> None:
        self.parts_done += 1
        if self._bar is not None:
            self._postfix()

    def snapshot(self) -> dict[str, Any]:
        elapsed = self.elapsed_s
        rate = self.rows_run / elapsed if elapsed > 0 else 0.0
        left = self.rows_total - self.rows_done
        return {
            "event": "progress",
            "rows_done": self.rows_done,
            "rows_total": self.rows_total,
            "rows_per_s": round(rate, 1),
            "eta_s": round(left / rate, 1) if rate > 0 else None,
            "rejected": self.rejected,
            "parts_done": self.parts_done,
            "parts_total": self.parts_total,
            "elapsed_s": round(elapsed, 2),
        }

    def emit(self) -> None:
        self._last = time.perf_counter()
        print(json.dumps(self.snapshot()), file=self.out, flush=True)

    def finish(self, summary: RunSummary) -> None:
        if self._bar is not None:
            self._bar.close()
            print(summary.describe(), file=self.out)
        elif self.mode == "json":
            self.emit()
            print(json.dumps({"event": "summary", **asdict(summary)}), file=self.out, flush=True)

    def abort(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def _postfix(self) -> None:
        self._bar.set_postfix_str(f"parts {self.parts_done}/{self.parts_total} rejected {self.rejected:,}")
