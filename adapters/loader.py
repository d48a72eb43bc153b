"""One artifact loader for serving and for offline work (conversion, parity, quantization).

``load_predictor`` loads an artifact through the same adapter a worker would use, with
the same options (``options.module`` and ``options.module_kwargs`` for a torch state
dict, ``options.signature`` for a SavedModel, ...), the same format detection and the
same trust rules (pickle-based or code-importing artifacts need a pinned sha256). It
returns the framework's model object (what a converter needs) and a predictor (named
arrays in, named arrays out) under the names the caller's schema gives.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hetbatch.adapters.base import Adapter, AdapterError, ModelLoadError, Options, TensorInfo
from hetbatch.adapters.offline.parity import Predictor

__all__ = ["load_adapter", "load_predictor", "onnx_predictor", "tf_call"]


def load_adapter(
    framework: str,
    artifact: str | os.PathLike[str],
    *,
    options: Mapping[str, Any] | Options | None = None,
    device: str = "cpu",
    sha256: str | None = None,
    pinned: bool = False,
) -> Adapter:
    """The loaded adapter of ``framework`` for ``artifact`` (what a worker loads).

    Raises:
        InvalidOptions: an unknown or mistyped option.
        ModelLoadError: missing artifact, hash mismatch or a failed load.
        UnsafeArtifact: pickle-based or code-importing artifact without a pinned hash.
        MissingFramework: the framework is not installed.
    """
    from hetbatch.adapters import adapter_class

    return adapter_class(framework)(artifact, options=options, device=device, sha256=sha256, pinned=pinned).load()


def _renamer(have: Sequence[str], want: Sequence[str], what: str, artifact: Path) -> dict[str, str]:
    """Map the caller's names onto the model's: equal names as they are, else by position."""
    if set(have) == set(want):
        return {n: n for n in want}
    if len(have) != len(want):
        raise ModelLoadError(f"{artifact.name}: the model has {what} {list(have)}, the schema names {list(want)}")
    return dict(zip(want, have, strict=True))


def _schema_predictor(adapter: Adapter, inputs: Sequence[TensorInfo], outputs: Sequence[str]) -> Predictor:
    """The adapter's predict, under the schema's input and output names."""
    found_in, found_out = adapter.describe()
    names_in = _renamer([i.name for i in found_in], [i.name for i in inputs], "inputs", adapter.artifact)
    produced = [o.name for o in found_out]
    names_out = _renamer(produced, list(outputs), "outputs", adapter.artifact) if outputs else {}

    def predict(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = adapter.predict({names_in.get(n, n): a for n, a in arrays.items()})
        if not names_out:
            return result
        return {want: result[have] for want, have in names_out.items() if have in result}

    return predict


def tf_call(model: Any, named: Mapping[str, Any], inputs: Sequence[TensorInfo]) -> Any:
    """Call a Keras model (one input positionally, several by name) or a SavedModel signature."""
    if not hasattr(model, "layers"):  # a SavedModel signature: keyword arguments only
        return model(**{i.name: named[i.name] for i in inputs})
    return model(named[inputs[0].name] if len(inputs) == 1 else dict(named), training=False)


def onnx_predictor(path: str | os.PathLike[str], threads: int = 0) -> Predictor:
    """An in-process ONNX Runtime session on the CPU, as a predictor."""
    return load_adapter("onnx", path, options={"threads": threads}).predict


def load_predictor(
    framework: str,
    artifact: str | os.PathLike[str],
    inputs: Sequence[TensorInfo],
    outputs: Sequence[str],
    *,
    options: Mapping[str, Any] | None = None,
    sha256: str | None = None,
    pinned: bool = False,
) -> tuple[Any, Predictor]:
    """Load a source model on the CPU; returns (the framework's model object, a predictor).

    The model object is the scikit-learn estimator, the ONNX Runtime session, the torch
    module (TorchScript, an exported program's module, or the state dict's module) or
    the Keras model / SavedModel signature.

    Raises:
        InvalidOptions: an unknown or mistyped option.
        ModelLoadError: missing artifact, hash mismatch or a failed load.
        UnsafeArtifact: pickle-based or code-importing artifact without a pinned hash.
        AdapterError: no adapter for ``framework``.
    """
    path = Path(artifact)
    if not path.exists():
        raise ModelLoadError(f"artifact {path} does not exist")
    adapter = load_adapter(framework, path, options=options, sha256=sha256, pinned=pinned)
    model = next((getattr(adapter, a) for a in ("model", "session") if hasattr(adapter, a)), None)
    if model is None:
        raise AdapterError(f"the {framework} adapter exposes no model object to convert")
    return model, _schema_predictor(adapter, inputs, outputs)
