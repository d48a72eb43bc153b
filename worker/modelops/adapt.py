"""Adaptation of registered models: convert, optimize, quantize, then register the result.

The numerical work lives in ``adapters.offline.convert`` and ``adapters.offline.quantize``; this module
resolves the source entry in the registry, prepares the sample (a Parquet file read
through the model's input schema, or inputs generated from it), writes the new model's
directory with a ``model.toml`` that keeps the source's schema, and registers it as a
new version of the source (or under a new name) only when the report passed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hetbatch.adapters import TensorInfo
from hetbatch.adapters.offline.convert import ConversionResult, to_onnx
from hetbatch.adapters.offline.parity import ParityReport, Tolerance, sample_inputs
from hetbatch.adapters.offline.quantize import BATCH_SIZES, CompressionReport, Mode, optimize, quantize
from hetbatch.producers.errors import ConfigError
from hetbatch.producers.protocol.registry import ModelSpec, Registry
from hetbatch.producers.protocol.schema import table_to_arrays, to_table
from hetbatch.worker.modelops.registration import build_spec, write_config

__all__ = ["Adapted", "convert_model", "load_sample", "optimize_model", "quantize_model"]

_ARTIFACT = "model.onnx"


@dataclass(frozen=True)
class Adapted:
    """A registered adaptation: the new entry and the report that admitted it."""

    spec: ModelSpec
    report: ConversionResult | CompressionReport

    @property
    def parity(self) -> ParityReport:
        return self.report.parity

    def table(self) -> str:
        body = self.report.table() if isinstance(self.report, CompressionReport) else self.report.parity.table()
        return f"{body}\nregistered {self.spec.ref} ({self.spec.framework}, queue {self.spec.queue}) " + (
            f"from {Path(self.spec.artifact).parent}"
        )


def load_sample(
    spec: ModelSpec, path: str | Path | None, rows: int = 2048, labels: str | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The model's inputs from a Parquet file (first ``rows`` rows), or generated ones.

    Raises:
        ConfigError: labels asked for without a file, or the label column is missing.
        SchemaMismatch: the file does not fit the model's input schema.
    """
    if path is None:
        if labels:
            raise ConfigError("--labels needs a labelled --sample file")
        return sample_inputs(_infos(spec), rows=min(rows, 256)), None
    import pyarrow.parquet as pq

    table = pq.read_table(path).slice(0, rows)
    arrays = table_to_arrays(to_table(table, spec.inputs, cast="safe"), spec.inputs)
    if labels is None:
        return arrays, None
    if labels not in table.column_names:
        raise ConfigError(f"label column {labels!r} is not in {path}; it has {table.column_names[:10]}")
    return arrays, table.column(labels).to_numpy(zero_copy_only=False)


def _infos(spec: ModelSpec) -> list[TensorInfo]:
    return [TensorInfo(t.name, t.dtype, t.shape) for t in spec.inputs]


def _target(spec: ModelSpec, output: str | Path | None, suffix: str) -> Path:
    """A fresh directory for the new model: never overwrite a registered artifact."""
    if output is not None:
        directory = Path(output)
        if (directory / _ARTIFACT).exists():
            raise ConfigError(f"{directory / _ARTIFACT} exists; registered artifacts are immutable: pick another")
        return directory
    base = Path(spec.artifact).parent / f"{spec.name}-v{spec.version}-{suffix}"
    directory, n = base, 1
    while directory.exists():
        n += 1
        directory = base.with_name(f"{base.name}-{n}")
    return directory


@contextmanager
def _tidy(directory: Path) -> Iterator[None]:
    """Remove the new model's directory again if the step fails and left it empty."""
    try:
        yield
    except BaseException:
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
        raise


def _register(registry: Registry, source: ModelSpec, directory: Path, name: str | None, **changes: Any) -> ModelSpec:
    options = {"source": source.ref, **changes.pop("options", {})}
    config: dict[str, Any] = dict(
        name=name or source.name, framework="onnx", artifact=_ARTIFACT, device=source.device,
        max_batch_rows=source.max_batch_rows, max_delay_ms=source.max_delay_ms, nan=source.nan,
        fallback=source.fallback, classes=list(source.classes) if source.classes is not None else None,
        outputs=list(source.outputs), inputs=[t.to_dict() for t in source.inputs], options=options,
    )  # fmt: skip
    config.update(changes)
    write_config(directory, **config)
    registered: ModelSpec = registry.register(build_spec(directory))
    return registered


def convert_model(
    registry: Registry,
    ref: str,
    *,
    output: str | Path | None = None,
    name: str | None = None,
    sample: str | Path | None = None,
    sample_rows: int = 2048,
    rtol: Tolerance = "auto",
    force: bool = False,
) -> Adapted:
    """Convert a registered model to ONNX, check parity, register the result.

    Raises:
        ParityError: parity failed (nothing registered, nothing left on disk).
        AdapterError, ModelNotFound, ConfigError, SchemaMismatch: see the messages.
    """
    spec = registry.model(ref)
    if spec.framework == "onnx":
        raise ConfigError(f"{spec.ref} is an ONNX model already; see 'hetbatch optimize' and 'hetbatch quantize'")
    arrays, _ = load_sample(spec, sample, sample_rows)
    directory = _target(spec, output, "onnx")
    with _tidy(directory):
        result = to_onnx(
            spec.framework, spec.artifact, directory / _ARTIFACT, _infos(spec), spec.outputs,
            options=spec.options, sha256=spec.sha256, pinned=spec.pinned, sample=arrays, rtol=rtol, force=force,
            source_name=spec.ref,
        )  # fmt: skip
    return Adapted(_register(registry, spec, directory, name), result)


def _onnx_source(registry: Registry, ref: str, step: str) -> ModelSpec:
    spec = registry.model(ref)
    if spec.framework != "onnx":
        raise ConfigError(f"{step} works on ONNX models; convert {spec.ref} first: hetbatch convert {spec.ref}")
    return spec


def optimize_model(
    registry: Registry,
    ref: str,
    *,
    output: str | Path | None = None,
    name: str | None = None,
    sample: str | Path | None = None,
    sample_rows: int = 2048,
    level: str = "extended",
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
    force: bool = False,
    threads: int = 0,
) -> Adapted:
    """Save ONNX Runtime's optimized graph of a registered ONNX model and register it.

    Raises:
        ParityError: optimization changed values beyond tolerance (nothing registered).
        AdapterError, ModelNotFound, ConfigError: see the messages.
    """
    spec = _onnx_source(registry, ref, "optimize")
    arrays, _ = load_sample(spec, sample, sample_rows)
    directory = _target(spec, output, "optimized")
    with _tidy(directory):
        report = optimize(
            spec.artifact, directory / _ARTIFACT, arrays, spec.outputs, level=level, batch_sizes=batch_sizes,
            force=force, threads=threads, source_name=spec.ref,
        )  # fmt: skip
    return Adapted(_register(registry, spec, directory, name), report)


def quantize_model(
    registry: Registry,
    ref: str,
    *,
    mode: Mode = "int8",
    output: str | Path | None = None,
    name: str | None = None,
    sample: str | Path | None = None,
    sample_rows: int = 2048,
    labels: str | None = None,
    max_accuracy_drop: float = 0.01,
    min_agreement: float = 0.98,
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
    device: str = "cpu",
    force: bool = False,
    threads: int = 0,
) -> Adapted:
    """Quantize a registered ONNX model (int8, or fp16 for GPUs) and register it.

    The fp16 model is registered for the gpu pool, with the cpu pool as fallback.

    Raises:
        ParityError: the quantized model loses too much (nothing registered).
        AdapterError, ModelNotFound, ConfigError, SchemaMismatch: see the messages.
    """
    spec = _onnx_source(registry, ref, "quantize")
    arrays, truth = load_sample(spec, sample, sample_rows, labels)
    directory = _target(spec, output, mode)
    with _tidy(directory):
        report = quantize(
            spec.artifact, directory / _ARTIFACT, arrays, spec.outputs, mode=mode, labels=truth,
            classes=spec.classes, max_accuracy_drop=max_accuracy_drop, min_agreement=min_agreement,
            batch_sizes=batch_sizes, device=device, force=force, threads=threads, source_name=spec.ref,
        )  # fmt: skip
    changes: dict[str, Any] = {"device": "gpu", "fallback": "cpu"} if mode == "fp16" else {}
    return Adapted(_register(registry, spec, directory, name, **changes), report)
