"""Adapter errors, and what kind of failure a framework's exception is.

Tree::

    AdapterError
    ├── MissingFramework     the framework's package is not installed (names the extra)
    ├── ModelLoadError       the artifact cannot be loaded, or its first call failed
    │   ├── InvalidOptions   model.toml [options]: an unknown key or a value of the wrong type
    │   └── UnsafeArtifact   a pickle-based artifact without a pinned, matching sha256
    ├── PredictError         the model raised while predicting (after inputs were checked)
    │   └── OutOfMemory      ... because host or device memory ran out (a smaller call may fit)
    └── DeviceFailed         the device is unusable for this process (a sticky CUDA error):
                             the worker exits so its jobs are redelivered to another process

Every adapter turns whatever its framework raises into one of these, so a client sees
one ``remote_type`` for one kind of failure whatever the framework.
"""

from __future__ import annotations

__all__ = [
    "AdapterError",
    "DeviceFailed",
    "InvalidOptions",
    "MissingFramework",
    "ModelLoadError",
    "OutOfMemory",
    "PredictError",
    "UnsafeArtifact",
    "is_oom",
    "is_sticky",
]


class AdapterError(Exception):
    """Root of adapter errors."""


class MissingFramework(AdapterError):
    """The framework an adapter needs is not installed."""

    def __init__(self, framework: str, extra: str) -> None:
        super().__init__(f"{framework} is not installed; install it with: pip install 'hetbatch[{extra}]'")


class ModelLoadError(AdapterError):
    """The artifact could not be loaded, or the loaded model failed its first call."""


class InvalidOptions(ModelLoadError):
    """The model config's ``[options]`` hold a key the adapter does not know, or a bad value."""


class UnsafeArtifact(ModelLoadError):
    """A pickle-based artifact was refused: it runs code when loaded."""


class PredictError(AdapterError):
    """The model itself raised on a batch."""


class OutOfMemory(PredictError):
    """The model ran out of host or device memory on a batch; fewer rows per call may fit."""


class DeviceFailed(AdapterError):
    """A sticky device error: every later call in this process would fail the same way."""


# Lower-case fragments of the allocators' messages, framework by framework. CUDA reports
# cuBLAS/cuDNN workspace failures without the words "out of memory"; TensorFlow reports a
# failed device allocation while copying an input as "Dst tensor is not initialized".
_OOM_TEXT = (
    "out of memory",  # torch CUDA, CUDA runtime, TF ("OOM when allocating" says it too)
    "oom when allocating",  # TensorFlow ResourceExhaustedError
    "failed to allocate memory",  # ONNX Runtime BFCArena::AllocateRawInternal
    "is smaller than requested bytes",  # ONNX Runtime BFCArena with gpu_mem_limit
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    "cuda_error_out_of_memory",
    "cudaerrormemoryallocation",
    "dst tensor is not initialized",  # TensorFlow, device allocation during a host->device copy
    "can't allocate memory",  # torch DefaultCPUAllocator
    "std::bad_alloc",
)
_OOM_TYPES = frozenset({"OutOfMemoryError", "ResourceExhaustedError", "OutOfMemory"})

# Errors after which the CUDA context is corrupt: nothing in this process can use the
# device again (PyTorch's CUDA semantics notes; cudaErrorIllegalAddress is "sticky").
_STICKY_TEXT = (
    "device-side assert",
    "illegal memory access",
    "an illegal instruction was encountered",
    "misaligned address",
    "unspecified launch failure",
    "cuda_error_illegal_address",
    "cudaerrorillegaladdress",
    "cuda_error_launch_failed",
    "uncorrectable ecc error",
)


def is_oom(exc: BaseException) -> bool:
    """Out of memory, on the host or on a device, whatever the framework said it with."""
    if isinstance(exc, (MemoryError, OutOfMemory)) or type(exc).__name__ in _OOM_TYPES:
        return True
    text = str(exc).lower()
    return any(fragment in text for fragment in _OOM_TEXT)


def is_sticky(exc: BaseException) -> bool:
    """A device error that poisons the process's CUDA context (no later call can succeed)."""
    if isinstance(exc, DeviceFailed):
        return True
    text = str(exc).lower()
    return any(fragment in text for fragment in _STICKY_TEXT)
