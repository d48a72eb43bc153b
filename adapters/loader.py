"""Source models loaded in process for conversion and parity: every framework, one call.

``load_predictor`` returns the framework's model object (what a converter needs) and a
predictor (named arrays in, named arrays out) for the parity check. scikit-learn and
ONNX go through their adapters; torch and TensorFlow/Keras are loaded here, with the
same artifact conventions as their adapters, so conversion does not depend on them:
torch TorchScript ``.pt``/``.ts`` (``torch.jit.load``), ``.pt2`` (``torch.export.load``),
or a state dict with ``options.module = "pkg.mod:Class"`` (a class or factory, called
with ``options.module_kwargs``), which imports code and so needs a pinned sha256; Keras
``.keras`` (``safe_mode=True``) or a SavedModel directory (``options.signature``).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hetbatch.adapters.base import AdapterError, ModelLoadError, TensorInfo, UnsafeArtifact, sha256_of
from hetbatch.adapters.offline.parity import Predictor

__all__ = ["load_predictor", "onnx_predictor", "tf_call"]


def _split_target(target: str) -> tuple[str, str]:
    module, _, name = target.partition(":")
    if not module or not name:
        raise ModelLoadError(f"options.module must be 'package.module:Class', not {target!r}")
    return module, name


def _load_torch(artifact: Path, options: Mapping[str, Any], trusted: bool) -> Any:
    import torch

    if options.get("module"):
        if not trusted:
            raise UnsafeArtifact(
                f"{artifact.name} is a state dict for {options['module']}, which imports code: pin its sha256"
            )
        module_name, class_name = _split_target(str(options["module"]))
        cls = getattr(importlib.import_module(module_name), class_name)
        net = cls(**dict(options.get("module_kwargs", {})))
        net.load_state_dict(torch.load(artifact, map_location="cpu", weights_only=True))
        return net.eval()
    if artifact.suffix == ".pt2":
        return torch.export.load(str(artifact))
    if artifact.suffix in (".pt", ".ts", ".torchscript"):
        return torch.jit.load(str(artifact), map_location="cpu").eval()  # type: ignore[no-untyped-call]
    raise ModelLoadError(f"unknown torch artifact {artifact.name}: use TorchScript .pt, .pt2 or options.module")


class _Signature:
    """A SavedModel signature that keeps its SavedModel (and so its variables) alive."""

    def __init__(self, saved_model: Any, name: str) -> None:
        self.saved_model = saved_model
        self.function = saved_model.signatures[name]

    def __call__(self, **kwargs: Any) -> Any:
        return self.function(**kwargs)


def _load_tensorflow(artifact: Path, options: Mapping[str, Any]) -> Any:
    if artifact.is_dir():
        import tensorflow as tf

        return _Signature(tf.saved_model.load(str(artifact)), str(options.get("signature", "serving_default")))
    if artifact.suffix != ".keras":
        raise ModelLoadError(f"unknown TensorFlow artifact {artifact.name}: use .keras or a SavedModel directory")
    import keras

    return keras.saving.load_model(str(artifact), safe_mode=True, compile=False)


def _named(result: Any, outputs: Sequence[str]) -> dict[str, np.ndarray]:
    """A model's raw result (tensor, tuple, list or dict) -> the named numpy outputs."""
    if isinstance(result, Mapping):
        values = dict(result)
        if not all(n in values for n in outputs) and len(values) == len(outputs):
            values = dict(zip(outputs, values.values(), strict=True))
    elif isinstance(result, (tuple, list)):
        values = dict(zip(outputs, result, strict=False))
    else:
        values = {outputs[0]: result}
    return {k: np.asarray(v.detach().numpy() if hasattr(v, "detach") else v) for k, v in values.items()}


def _torch_predictor(model: Any, inputs: Sequence[TensorInfo], outputs: Sequence[str]) -> Predictor:
    import torch

    call = model.module() if hasattr(model, "graph_signature") else model

    def predict(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            return _named(call(*(torch.from_numpy(np.ascontiguousarray(arrays[i.name])) for i in inputs)), outputs)

    return predict


def tf_call(model: Any, named: Mapping[str, Any], inputs: Sequence[TensorInfo]) -> Any:
    """Call a Keras model (one input positionally, several by name) or a SavedModel signature."""
    if not hasattr(model, "layers"):  # a SavedModel signature: keyword arguments only
        return model(**{i.name: named[i.name] for i in inputs})
    return model(named[inputs[0].name] if len(inputs) == 1 else dict(named), training=False)


def _tf_predictor(model: Any, inputs: Sequence[TensorInfo], outputs: Sequence[str]) -> Predictor:
    def predict(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _named(tf_call(model, arrays, inputs), outputs)

    return predict


def onnx_predictor(path: str | os.PathLike[str], threads: int = 0) -> Predictor:
    """An in-process ONNX Runtime session on the CPU, as a predictor."""
    from hetbatch.adapters.onnx import OnnxAdapter

    adapter = OnnxAdapter(path, options={"threads": threads}).load()
    return adapter.predict


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
    """Load a source model; returns (the framework's model object, a predictor).

    Raises:
        ModelLoadError: missing artifact, hash mismatch or a failed load.
        UnsafeArtifact: pickle-based or code-importing artifact without a pinned hash.
    """
    from hetbatch.adapters import adapter_class

    path, options = Path(artifact), dict(options or {})
    if not path.exists():
        raise ModelLoadError(f"artifact {path} does not exist")
    if sha256 is not None and sha256_of(path) != sha256:
        raise ModelLoadError(f"artifact {path} changed since it was registered (sha256 differs)")
    if framework in ("sklearn", "onnx"):
        adapter = adapter_class(framework)(path, options=options, sha256=sha256, pinned=pinned).load()
        return getattr(adapter, "model", getattr(adapter, "session", None)), adapter.predict
    try:
        if framework == "torch":
            model = _load_torch(path, options, trusted=pinned and sha256 is not None)
            return model, _torch_predictor(model, inputs, outputs)
        if framework == "tensorflow":
            model = _load_tensorflow(path, options)
            return model, _tf_predictor(model, inputs, outputs)
    except AdapterError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{framework} could not load {path}: {exc}") from exc
    raise AdapterError(f"no converter for framework {framework!r}")
