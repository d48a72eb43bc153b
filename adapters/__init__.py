"""Framework adapters behind one interface, found by name without importing frameworks.

``import adapters`` imports no ML framework: ``adapter_class("torch")`` imports
``adapters.torch`` only when first asked.
"""

from __future__ import annotations

import importlib

from hetbatch.adapters.base import (
    Adapter,
    AdapterError,
    Capabilities,
    DeviceFailed,
    InvalidOptions,
    MissingFramework,
    ModelLoadError,
    Options,
    OutOfMemory,
    PredictError,
    TensorInfo,
    UnsafeArtifact,
    sha256_of,
)

__all__ = [
    "ADAPTERS",
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
    "adapter_class",
    "sha256_of",
]

# framework -> (module:class, pip extra that installs the framework)
ADAPTERS: dict[str, tuple[str, str]] = {
    "sklearn": ("hetbatch.adapters.sklearn:SklearnAdapter", "sklearn"),
    "onnx": ("hetbatch.adapters.onnx:OnnxAdapter", "onnx"),
    "torch": ("hetbatch.adapters.torch:TorchAdapter", "torch"),
    "tensorflow": ("hetbatch.adapters.tensorflow:TensorflowAdapter", "tensorflow"),
}


def adapter_class(framework: str) -> type[Adapter]:
    """The adapter class for ``framework``, importing its module on first use.

    Raises:
        AdapterError: unknown framework.
        MissingFramework: the framework's package is not installed.
    """
    if framework not in ADAPTERS:
        raise AdapterError(f"no adapter for framework {framework!r}; known: {sorted(ADAPTERS)}")
    target, extra = ADAPTERS[framework]
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("hetbatch"):
            raise
        raise MissingFramework(framework, extra) from exc
    cls: type[Adapter] = getattr(module, class_name)
    return cls
