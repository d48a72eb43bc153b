"""Offline ONNX Runtime graph optimization and int8/fp16 quantization, with reports.

Each step writes a new ``.onnx`` file next to nothing else (registration is the
worker's job), checks it against the model it came from with a parity report, and
measures size and rows/s before and after. Optimization must keep values within the
float tolerance; quantization changes values by design, so it is gated on label (or
arg-max) agreement and, given a labelled sample, on the accuracy it loses.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from hetbatch.adapters.base import AdapterError, MissingFramework
from hetbatch.adapters.loader import onnx_predictor
from hetbatch.adapters.offline.parity import ParityError, ParityReport, Predictor, Tolerance, parity

__all__ = ["BATCH_SIZES", "CompressionReport", "Throughput", "optimize", "profile", "quantize"]

BATCH_SIZES = (1, 64, 4096)
Mode = Literal["int8", "fp16"]


@dataclass(frozen=True)
class Throughput:
    """Rows per second of the model before and after, at one batch size."""

    batch_rows: int
    before_rows_s: float
    after_rows_s: float

    @property
    def speedup(self) -> float:
        return self.after_rows_s / self.before_rows_s if self.before_rows_s else float("nan")


@dataclass(frozen=True)
class CompressionReport:
    """What an optimize or quantize step produced.

    Attributes:
        step: ``optimize``, ``int8`` or ``fp16``.
        path: the new ``.onnx`` file.
        size_before_bytes, size_after_bytes: file sizes.
        throughput: rows/s before and after per batch size (empty when not measured).
        parity: the new model against the one it came from.
        note: why something was not measured, if so.
    """

    step: str
    path: Path
    size_before_bytes: int
    size_after_bytes: int
    throughput: tuple[Throughput, ...]
    parity: ParityReport
    note: str = ""

    @property
    def size_ratio(self) -> float:
        return self.size_after_bytes / self.size_before_bytes

    def table(self) -> str:
        """Parity, size and throughput as a plain-text table."""
        lines = [
            self.parity.table(),
            f"size: {self.size_before_bytes:,} -> {self.size_after_bytes:,} bytes "
            f"({100 * (self.size_ratio - 1):+.1f}%)",
        ]
        if self.throughput:
            lines.append(f"{'batch rows':>10} {'rows/s before':>14} {'rows/s after':>14} {'speedup':>8}")
            lines += [
                f"{t.batch_rows:>10} {t.before_rows_s:>14,.0f} {t.after_rows_s:>14,.0f} {t.speedup:>7.2f}x"
                for t in self.throughput
            ]
        if self.note:
            lines.append(f"note: {self.note}")
        return "\n".join(lines)


def _batch(sample: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    n = len(next(iter(sample.values())))
    index = np.arange(rows) % n
    return {k: np.ascontiguousarray(v[index]) for k, v in sample.items()}


def profile(
    predictor: Predictor, sample: Mapping[str, np.ndarray], batch_sizes: Sequence[int], budget_s: float = 0.5
) -> dict[int, float]:
    """Rows/s of ``predictor`` per batch size (rows cycled from ``sample``), best of runs.

    Each batch size runs for about ``budget_s`` after one warm-up call; the fastest call
    counts, since on a shared machine the slow ones measure the neighbours.
    """
    out: dict[int, float] = {}
    for rows in batch_sizes:
        batch = _batch(sample, rows)
        predictor(batch)
        best, deadline = float("inf"), time.perf_counter() + budget_s
        calls = 0
        while calls < 3 or time.perf_counter() < deadline:
            started = time.perf_counter()
            predictor(batch)
            best = min(best, time.perf_counter() - started)
            calls += 1
        out[rows] = rows / best
    return out


def _throughput(before: Predictor, after: Predictor, sample: Mapping[str, np.ndarray], sizes: Sequence[int]) -> Any:
    old, new = profile(before, sample, sizes), profile(after, sample, sizes)
    return tuple(Throughput(n, old[n], new[n]) for n in sizes)


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingFramework("onnxruntime", "onnx") from exc
    return onnxruntime


def optimize(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    sample: Mapping[str, np.ndarray],
    outputs: Sequence[str],
    *,
    level: str = "extended",
    batch_sizes: Sequence[int] = BATCH_SIZES,
    rtol: Tolerance = "auto",
    force: bool = False,
    threads: int = 0,
    source_name: str = "source",
) -> CompressionReport:
    """Save ONNX Runtime's offline-optimized graph of ``source`` at ``output``.

    ``extended`` (the default) keeps the file portable across CPUs; ``all`` adds
    layout changes specific to this machine's hardware.

    Raises:
        ParityError: the optimized graph changed values beyond ``rtol`` (file removed).
        AdapterError: unknown level, or ONNX Runtime failed on the model.
    """
    ort = _ort()
    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if level not in levels:
        raise AdapterError(f"optimization level {level!r} is not one of {sorted(levels)}")
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[level]
    opts.optimized_model_filepath = str(path)
    try:
        ort.InferenceSession(str(source), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise AdapterError(f"ONNX Runtime could not optimize {source}: {exc}") from exc
    before, after = onnx_predictor(source, threads), onnx_predictor(path, threads)
    return _finish("optimize", Path(source), path, before, after, sample, outputs, batch_sizes, force,
                   dict(source_name=source_name, rtol=rtol))  # fmt: skip


def _finish(
    step: str,
    source: Path,
    path: Path,
    before: Predictor,
    after: Predictor,
    sample: Mapping[str, np.ndarray],
    outputs: Sequence[str],
    batch_sizes: Sequence[int],
    force: bool,
    parity_args: dict[str, Any],
    note: str = "",
) -> CompressionReport:
    name = parity_args.pop("source_name")
    try:
        report = parity(before, after, sample, outputs, source_name=f"{name} (onnx)",
                        candidate_name=f"{path.name} ({step})", **parity_args)  # fmt: skip
        speed = _throughput(before, after, sample, batch_sizes) if batch_sizes else ()
    except Exception:
        path.unlink(missing_ok=True)
        raise
    result = CompressionReport(step, path, source.stat().st_size, path.stat().st_size, speed, report, note)
    if not report.ok and not force:
        path.unlink(missing_ok=True)
        raise ParityError(f"{name}: the {step} model does not keep the source's results; not kept", report)
    return result


def _fp16(source: Path, path: Path) -> None:
    import onnx

    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as exc:
        raise MissingFramework("onnxruntime (with onnxruntime.transformers)", "onnx") from exc
    # Inputs and outputs stay float32, so the registered schema is unchanged.
    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    onnx.save(model, str(path))


def quantize(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    sample: Mapping[str, np.ndarray],
    outputs: Sequence[str],
    *,
    mode: Mode = "int8",
    labels: np.ndarray | None = None,
    classes: Sequence[object] | None = None,
    max_accuracy_drop: float = 0.01,
    min_agreement: float = 0.98,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    device: str = "cpu",
    force: bool = False,
    threads: int = 0,
    source_name: str = "source",
) -> CompressionReport:
    """Write an int8 (dynamic, weights and activations of MatMul/Gemm/...) or fp16 copy.

    fp16 targets GPUs: on ``device="cpu"`` only parity is measured (ONNX Runtime's CPU
    kernels upcast fp16, so a CPU speed figure would mislead).

    Args:
        labels: true labels of the sample rows; the accuracy delta gates the result.
        max_accuracy_drop: accuracy (fraction) the quantized model may lose.
        min_agreement: fraction of rows whose label or arg-max must agree.

    Raises:
        ParityError: the quantized model loses more than allowed (file removed).
        AdapterError: unknown mode, or quantization failed.
    """
    path, source = Path(output), Path(source)
    path.parent.mkdir(parents=True, exist_ok=True)
    note = ""
    try:
        if mode == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            with _quiet_root_logger():
                quantize_dynamic(source, path, weight_type=QuantType.QInt8)
        elif mode == "fp16":
            _fp16(source, path)
            if device != "gpu":
                note, batch_sizes = "fp16 targets GPU; throughput not measured on the CPU", ()
        else:
            raise AdapterError(f"quantization mode {mode!r} is not one of int8, fp16")
    except AdapterError:
        raise
    except Exception as exc:
        path.unlink(missing_ok=True)
        raise AdapterError(f"{mode} quantization of {source} failed: {exc}") from exc
    if path.stat().st_size >= source.stat().st_size:
        note = f"{mode} changed no weights (no float32 MatMul/Gemm/Conv initializers?): the model did not shrink"
    before, after = _device_predictor(source, device, threads), _device_predictor(path, device, threads)
    args = dict(source_name=source_name, rtol=None, min_agreement=min_agreement, labels=labels,
                max_accuracy_drop=max_accuracy_drop, classes=classes)  # fmt: skip
    return _finish(mode, source, path, before, after, sample, outputs, batch_sizes, force, args, note)


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """ONNX Runtime's quantizer logs advice and whole tensor protos on the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _device_predictor(path: Path, device: str, threads: int) -> Predictor:
    from hetbatch.adapters.onnx import OnnxAdapter

    return OnnxAdapter(path, options={"threads": threads}, device=device).load().predict
