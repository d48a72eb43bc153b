"""The adapter interface every framework runtime implements, and its errors.

Tree::

    AdapterError
    ├── MissingFramework   the framework's package is not installed (names the extra)
    ├── ModelLoadError     the artifact cannot be loaded
    │   └── UnsafeArtifact a pickle-based artifact without a pinned, matching sha256
    └── PredictError       the model raised while predicting (after inputs were checked)
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Adapter",
    "AdapterError",
    "MissingFramework",
    "ModelLoadError",
    "PredictError",
    "TensorInfo",
    "UnsafeArtifact",
    "sha256_of",
]


class AdapterError(Exception):
    """Root of adapter errors."""


class MissingFramework(AdapterError):
    """The framework an adapter needs is not installed."""

    def __init__(self, framework: str, extra: str) -> None:
        super().__init__(f"{framework} is not installed; install it with: pip install 'hetbatch[{extra}]'")


class ModelLoadError(AdapterError):
    """The artifact could not be loaded."""


class UnsafeArtifact(ModelLoadError):
    """A pickle-based artifact was refused: it runs code when loaded."""


class PredictError(AdapterError):
    """The model itself raised on a batch."""


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


class Adapter(ABC):
    """One loaded model of one framework.

    Subclasses implement ``_load``, ``predict`` and ``describe``. ``predict`` takes
    named arrays of shape (N, ...) and returns named arrays of the same N.

    Args:
        artifact: model file or directory.
        options: framework-specific settings from the model config.
        device: ``cpu`` or ``gpu``.
        sha256: expected hash of the artifact (checked before loading), or None.
        pinned: the hash was pinned by the config author: only then are pickle-based
            artifacts loaded.
    """

    framework: str = ""
    pickle_suffixes: tuple[str, ...] = ()

    def __init__(
        self,
        artifact: str | os.PathLike[str],
        *,
        options: Mapping[str, Any] | None = None,
        device: str = "cpu",
        sha256: str | None = None,
        pinned: bool = False,
    ) -> None:
        self.artifact = Path(artifact)
        self.options = dict(options or {})
        self.device = device
        self.sha256 = sha256
        self.pinned = pinned
        self.loaded = False

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
            raise ModelLoadError(f"{self.framework} could not load {self.artifact}: {exc}") from exc
        self.loaded = True
        return self

    def is_pickle(self) -> bool:
        return self.artifact.suffix in self.pickle_suffixes

    @abstractmethod
    def _load(self) -> None:
        """Load the artifact into memory (framework-specific)."""

    @abstractmethod
    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on one batch: named (N, ...) arrays in, named (N, ...) arrays out."""

    @abstractmethod
    def describe(self) -> tuple[list[TensorInfo], list[TensorInfo]]:
        """The loaded model's inputs and outputs, as far as the framework tells."""

    def classes(self) -> list[Any] | None:
        """Class labels in probability-column order, for classifiers."""
        return None

    def unload(self) -> None:
        """Release the model (and device memory)."""
        self.loaded = False
