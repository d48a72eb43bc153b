"""The adapter interface every framework runtime implements.

An adapter loads one artifact (``load``), is called once on a tiny synthetic batch at
load (``warm_up``: a device or dtype mismatch is one load error, not a failed job per
request), and predicts (``predict``). It declares its typed options (``options_type``)
and what the worker may do with its models (``capabilities``). ``predict`` turns
whatever the framework raises into the errors of ``adapters.errors``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from hetbatch.adapters.errors import (
    AdapterError,
    DeviceFailed,
    InvalidOptions,
    MissingFramework,
    ModelLoadError,
    OutOfMemory,
    PredictError,
    UnsafeArtifact,
    is_oom,
    is_sticky,
)
from hetbatch.adapters.options import Capabilities, Options

__all__ = [
    "Adapter",
    "AdapterError",
    "Capabilities",
    "DeviceFailed",
    "InvalidOptions",
    "MissingFramework",
    "ModelLoadError",
    "Options",
    "OutOfMemory",
    "PredictError",
    "TensorInfo",
    "UnsafeArtifact",
    "is_oom",
    "is_sticky",
    "sample_inputs",
    "sha256_of",
]

log = logging.getLogger(__name__)

WARM_UP_ROWS = 2


@dataclass(frozen=True)
class TensorInfo:
    """What a loaded model says about one of its inputs or outputs.

    ``shape`` is per row (batch axis excluded); ``None`` marks a size the model leaves open.
    """

    name: str
    dtype: str
    shape: tuple[int | None, ...] = ()


def sha256_of(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, or of a directory's files (relative names and contents, sorted)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def sample_inputs(inputs: Sequence[TensorInfo], rows: int = 256, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs that fit the schema (standard normal floats, small integers).

    Raises:
        AdapterError: an input has an open size or a dtype that cannot be generated.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for info in inputs:
        if any(d is None for d in info.shape):
            raise AdapterError(f"input {info.name!r} has open sizes {info.shape}; pass a sample file")
        shape = (rows, *(int(d) for d in info.shape if d is not None))
        kind = np.dtype(info.dtype).kind if info.dtype != "string" else "U"
        if kind == "f":
            out[info.name] = rng.standard_normal(shape).astype(info.dtype)
        elif kind in "iu":
            out[info.name] = rng.integers(0, 10, shape).astype(info.dtype)
        elif kind == "b":
            out[info.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            raise AdapterError(f"cannot generate {info.dtype} values for input {info.name!r}; pass a sample file")
    return out


def _warm_batch(inputs: Sequence[TensorInfo], rows: int) -> dict[str, np.ndarray]:
    """Zeros of the declared dtypes and shapes (an open size is 1): zero is a valid index
    for any embedding, so the call tests placement and dtypes, not the model's value range."""
    batch: dict[str, np.ndarray] = {}
    for info in inputs:
        shape = (rows, *(1 if d is None else int(d) for d in info.shape))
        if info.dtype == "string":
            batch[info.name] = np.full(shape, "", dtype=object)
        else:
            batch[info.name] = np.zeros(shape, dtype=info.dtype)
    return batch


def _shapes(inputs: Mapping[str, Any]) -> str:
    return ", ".join(f"{n}: {getattr(a, 'dtype', '?')}{list(np.shape(a))}" for n, a in inputs.items())


def _first_line(exc: BaseException) -> str:
    """The message on one line: its first line, and its last where the first is only a
    heading (TorchScript: "The following operation failed ...", the cause comes last)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


class Adapter(ABC):
    """One loaded model of one framework.

    Subclasses implement ``_load``, ``_predict`` and ``describe``, and declare
    ``options_type`` and ``CAPABILITIES``. ``predict`` takes named arrays of shape
    (N, ...) and returns named arrays of the same N.

    Args:
        artifact: model file or directory.
        options: the model config's ``[options]`` (checked against ``options_type``).
        device: ``cpu`` or ``gpu``.
        sha256: expected hash of the artifact (checked before loading), or None.
        pinned: the hash was pinned by the config author: only then are pickle-based
            artifacts loaded.

    Raises:
        InvalidOptions: an unknown option key or a value of the wrong type.
    """

    framework: ClassVar[str] = ""
    pickle_suffixes: ClassVar[tuple[str, ...]] = ()
    options_type: ClassVar[type[Options]] = Options
    CAPABILITIES: ClassVar[Capabilities] = Capabilities()

    def __init__(
        self,
        artifact: str | os.PathLike[str],
        *,
        options: Mapping[str, Any] | Options | None = None,
        device: str = "cpu",
        sha256: str | None = None,
        pinned: bool = False,
    ) -> None:
        self.artifact = Path(artifact)
        self.options: Options = self.options_type.parse(options, self.framework)
        self.device = device
        self.sha256 = sha256
        self.pinned = pinned
        self.loaded = False

    @classmethod
    def capabilities(cls, artifact: str | os.PathLike[str]) -> Capabilities:
        """What the worker may do with this artifact's model (read without loading it)."""
        return cls.CAPABILITIES

    def load(self) -> Adapter:
        """Verify the artifact and load it.

        Raises:
            ModelLoadError: missing file, hash mismatch, or the framework failed to load it.
            UnsafeArtifact: a pickle-based artifact without a pinned hash.
            MissingFramework: the framework is not installed.
        """
        if not self.artifact.exists():
            raise ModelLoadError(f"artifact {self.artifact} does not exist on this worker")
        if self.is_pickle() and not (self.pinned and self.sha256):
            raise UnsafeArtifact(
                f"{self.artifact.name} is pickle-based and runs code when loaded; pin its sha256 in the "
                "model config (sha256 = '...') to trust it, or convert it to a safe format"
            )
        if self.sha256 is not None:
            actual = sha256_of(self.artifact)
            if actual != self.sha256:
                raise ModelLoadError(
                    f"artifact {self.artifact} has sha256 {actual}, registry says {self.sha256}: "
                    "it changed since registration; register it again as a new version"
                )
        try:
            self._load()
        except AdapterError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"{self.framework} could not load {self.artifact}: {_first_line(exc)}") from exc
        self.loaded = True
        return self

    def warm_up(self, inputs: Sequence[TensorInfo], rows: int = WARM_UP_ROWS) -> None:
        """Call the model once on ``rows`` rows of zeros of the declared inputs, on its device.

        A model that cannot run where it was placed (a graph with the CPU baked in, a
        dtype the device lacks) fails here, once, instead of failing every job.

        Raises:
            ModelLoadError: the call failed, or an output does not have one row per input row.
        """
        where = f"{self.framework} model {self.artifact.name} on {self.device}"
        try:
            outputs = self.predict(_warm_batch(inputs, rows))
        except AdapterError as exc:
            raise ModelLoadError(f"{where} failed its first call ({rows} rows of zeros): {exc}") from exc
        for name, arr in outputs.items():
            if np.ndim(arr) == 0 or len(arr) != rows:
                raise ModelLoadError(f"{where}: output {name!r} has shape {np.shape(arr)} for {rows} input rows")

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on one batch: named (N, ...) arrays in, named (N, ...) arrays out.

        Raises:
            OutOfMemory: host or device memory ran out (released before this is raised).
            DeviceFailed: a sticky device error; this process cannot use the device again.
            PredictError: any other failure of the model on this batch.
        """
        try:
            return self._predict(inputs)
        except AdapterError:
            raise
        except Exception as exc:
            if is_sticky(exc):
                raise DeviceFailed(f"{self.framework} on {self.device}: {_first_line(exc)}") from exc
            if not is_oom(exc):
                raise PredictError(
                    f"{self.framework} model failed on inputs {{{_shapes(inputs)}}}: {_first_line(exc)}"
                ) from exc
            message = f"{self.framework} ran out of memory on {{{_shapes(inputs)}}}: {_first_line(exc)}"
        # Only here, after the except clause, are the framework's exception and its
        # traceback gone, and with them the frames that held this call's tensors: now
        # the allocator can give their memory back. (Not chained, for the same reason.)
        self.release_memory()
        raise OutOfMemory(message)

    @abstractmethod
    def _load(self) -> None:
        """Load the artifact into memory (framework-specific)."""

    @abstractmethod
    def _predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The framework's call on one batch (its exceptions are typed by ``predict``)."""

    @abstractmethod
    def describe(self) -> tuple[list[TensorInfo], list[TensorInfo]]:
        """The loaded model's inputs and outputs, as far as the framework tells."""

    def is_pickle(self) -> bool:
        return self.artifact.suffix in self.pickle_suffixes

    def classes(self) -> list[Any] | None:
        """Class labels in probability-column order, for classifiers."""
        return None

    def release_memory(self) -> None:
        """Give cached device memory back after an out-of-memory error (framework-specific)."""
        return None

    def unload(self) -> None:
        """Release the model (and device memory)."""
        self.loaded = False
