"""Numerical parity between two runs of "the same" model, reported per output.

Used by conversion, optimization and quantization: the source and the candidate model
run in-process on the same sample, and every output is compared. The relative error of
one element is ``|candidate - source| / max(|source|, 1e-3 * max|source|)``: elements far
below the output's own scale are judged against a thousandth of that scale, so a
probability of 1e-9 that comes out as 1.1e-9 is not a 10% error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from hetbatch.adapters.base import AdapterError, sample_inputs

__all__ = [
    "DEFAULT_RTOL",
    "OutputParity",
    "ParityError",
    "ParityReport",
    "Predictor",
    "Tolerance",
    "compare",
    "parity",
    "sample_inputs",
]

Predictor = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]
Tolerance = float | Literal["auto"] | None

# Relative tolerance by the lower precision of the two outputs compared.
DEFAULT_RTOL = {"float16": 1e-2, "float32": 1e-4, "float64": 1e-4}
_SCALE_FLOOR = 1e-3


class ParityError(AdapterError):
    """The candidate model does not reproduce the source model within tolerance.

    Attributes:
        report: the parity report that failed.
    """

    def __init__(self, message: str, report: ParityReport) -> None:
        super().__init__(f"{message}\n{report.table()}")
        self.report = report


@dataclass(frozen=True)
class OutputParity:
    """How one output of the candidate compares with the source.

    Attributes:
        name: output name.
        max_abs: largest absolute difference (NaN for label outputs).
        max_rel: largest relative difference (see the module docstring).
        rtol: the tolerance ``max_rel`` was held to, or None when values are not gated.
        agreement: fraction of rows whose label (integer or string output) or arg-max
            (2-D float output) agrees, or None when neither applies.
        agreement_gated: whether ``agreement`` must reach the minimum.
        ok: this output passed.
    """

    name: str
    max_abs: float
    max_rel: float
    rtol: float | None
    agreement: float | None
    agreement_gated: bool
    ok: bool


@dataclass(frozen=True)
class ParityReport:
    """Source versus candidate on one sample.

    Attributes:
        source: what ran as the reference (e.g. ``iris@1 (sklearn)``).
        candidate: what was compared with it.
        rows: sample rows.
        outputs: one entry per compared output.
        min_agreement: the label agreement required.
        accuracy: (source, candidate) accuracy on the labelled sample, if labels were given.
        max_accuracy_drop: the accuracy loss allowed, or None when accuracy is not gated.
    """

    source: str
    candidate: str
    rows: int
    outputs: tuple[OutputParity, ...]
    min_agreement: float = 1.0
    accuracy: tuple[float, float] | None = None
    max_accuracy_drop: float | None = None

    @property
    def accuracy_delta(self) -> float | None:
        """Candidate accuracy minus source accuracy (negative: the candidate is worse)."""
        return None if self.accuracy is None else self.accuracy[1] - self.accuracy[0]

    @property
    def ok(self) -> bool:
        drop_ok = True
        if self.accuracy_delta is not None and self.max_accuracy_drop is not None:
            drop_ok = -self.accuracy_delta <= self.max_accuracy_drop + 1e-12
        return drop_ok and all(o.ok for o in self.outputs)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs if not np.isnan(o.max_rel)), default=0.0)

    def table(self) -> str:
        """The report as a plain-text table."""
        lines = [
            f"parity: {self.candidate} vs {self.source} on {self.rows} rows",
            f"{'output':<16} {'max abs err':>12} {'max rel err':>12} {'tolerance':>10} {'agreement':>10}  result",
        ]
        for o in self.outputs:
            agree = "-" if o.agreement is None else f"{100 * o.agreement:.2f}%"
            tol = "-" if o.rtol is None else f"{o.rtol:.0e}"
            mark = "" if o.agreement_gated or o.agreement is None else " (argmax)"
            lines.append(
                f"{o.name:<16} {_num(o.max_abs):>12} {_num(o.max_rel):>12} {tol:>10} {agree:>10}  "
                f"{'ok' if o.ok else 'FAIL'}{mark}"
            )
        if self.accuracy is not None:
            src, cand = self.accuracy
            allowed = "" if self.max_accuracy_drop is None else f" (allowed drop {100 * self.max_accuracy_drop:.2f})"
            lines.append(
                f"accuracy on labels: source {100 * src:.2f}%, candidate {100 * cand:.2f}%, "
                f"delta {100 * (cand - src):+.2f} points{allowed}"
            )
        lines.append(f"verdict: {'PASS' if self.ok else 'FAIL'}")
        return "\n".join(lines)


def _num(value: float) -> str:
    return "-" if np.isnan(value) else f"{value:.3e}"


def _is_label(arr: np.ndarray) -> bool:
    return arr.dtype.kind in "iubOUS"


def _argmax(arr: np.ndarray) -> np.ndarray | None:
    return arr.argmax(axis=1) if arr.ndim == 2 and arr.shape[1] > 1 and arr.dtype.kind == "f" else None


def _default_rtol(a: np.ndarray, b: np.ndarray) -> float:
    widths = [x.dtype.itemsize for x in (a, b) if x.dtype.kind == "f"]
    return DEFAULT_RTOL.get(f"float{8 * min(widths)}", 1e-4) if widths else 1e-4


def compare(
    name: str,
    source: np.ndarray,
    candidate: np.ndarray,
    *,
    rtol: Tolerance,
    min_agreement: float = 1.0,
    gate_argmax: bool = False,
) -> OutputParity:
    """Compare one output; ``rtol`` None means values are reported but not gated.

    A shape mismatch is a failed output (infinite error), not an exception.
    """
    source, candidate = np.asarray(source), np.asarray(candidate)
    if source.shape != candidate.shape:
        return OutputParity(name, np.inf, np.inf, None if rtol == "auto" else rtol, None, True, False)
    if _is_label(source) or _is_label(candidate):
        agreement = float(np.mean(source == candidate)) if len(source) else 1.0
        return OutputParity(name, np.nan, np.nan, None, agreement, True, agreement >= min_agreement)
    s, c = source.astype(np.float64), candidate.astype(np.float64)
    diff = np.abs(c - s)
    scale = float(np.max(np.abs(s))) if s.size else 0.0
    floor = max(_SCALE_FLOOR * scale, np.finfo(np.float64).tiny)
    rel = diff / np.maximum(np.abs(s), floor)
    max_abs = float(np.max(diff)) if diff.size else 0.0
    max_rel = float(np.max(rel)) if rel.size else 0.0
    if np.isnan(diff).any():
        max_abs = max_rel = np.inf
    a_s, a_c = _argmax(s), _argmax(c)
    top_agreement = float(np.mean(a_s == a_c)) if a_s is not None and a_c is not None and len(s) else None
    limit: float | None = _default_rtol(source, candidate) if rtol == "auto" else rtol
    ok = limit is None or max_rel <= limit
    if gate_argmax and top_agreement is not None:
        ok = ok and top_agreement >= min_agreement
    return OutputParity(name, max_abs, max_rel, limit, top_agreement, gate_argmax, ok)


def _predicted(outputs: Mapping[str, np.ndarray]) -> np.ndarray | None:
    if "label" in outputs:
        return np.asarray(outputs["label"]).reshape(-1)
    for arr in outputs.values():
        top = _argmax(np.asarray(arr))
        if top is not None:
            return top
    return None


def parity(
    source: Predictor,
    candidate: Predictor,
    sample: Mapping[str, np.ndarray],
    outputs: Sequence[str],
    *,
    source_name: str = "source",
    candidate_name: str = "candidate",
    rtol: Tolerance = "auto",
    min_agreement: float = 1.0,
    labels: np.ndarray | None = None,
    max_accuracy_drop: float | None = None,
    classes: Sequence[object] | None = None,
) -> ParityReport:
    """Run both models on ``sample`` and compare ``outputs``.

    Args:
        rtol: relative tolerance; "auto" picks the default for the outputs' precision
            (``DEFAULT_RTOL``), None reports values without gating them (label and
            arg-max agreement then gate instead).
        labels: true labels of the sample rows, for the accuracy of both models.
        max_accuracy_drop: accuracy loss allowed (fraction), when labels are given.
        classes: class labels in probability-column order, to score arg-max outputs.

    Raises:
        AdapterError: either model failed on the sample or lacks one of ``outputs``.
    """
    want = {k: np.ascontiguousarray(v) for k, v in sample.items()}
    expected, got = source(want), candidate(want)
    rows = len(next(iter(want.values())))
    results = []
    for name in outputs:
        for label, found in ((source_name, expected), (candidate_name, got)):
            if name not in found:
                raise AdapterError(f"{label} has no output {name!r}; it gives {sorted(found)}")
        results.append(
            compare(name, expected[name], got[name], rtol=rtol, min_agreement=min_agreement, gate_argmax=rtol is None)
        )
    accuracy = None
    if labels is not None:
        accuracy = (_accuracy(expected, labels, classes), _accuracy(got, labels, classes))
    return ParityReport(source_name, candidate_name, rows, tuple(results), min_agreement, accuracy, max_accuracy_drop)


def _accuracy(outputs: Mapping[str, np.ndarray], labels: np.ndarray, classes: Sequence[object] | None) -> float:
    predicted = _predicted(outputs)
    if predicted is None:
        raise AdapterError("accuracy needs a 'label' output or a 2-D probability/score output")
    if "label" not in outputs and classes is not None:
        predicted = np.asarray(classes, dtype=object)[predicted]
    truth = np.asarray(labels).reshape(-1)
    if len(truth) != len(predicted):
        raise AdapterError(f"{len(truth)} labels for {len(predicted)} rows")
    return float(np.mean(predicted.astype(object) == truth.astype(object)))
