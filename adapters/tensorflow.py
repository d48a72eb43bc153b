"""TensorFlow and Keras models: SavedModel directories and ``.keras`` files.

TensorFlow reads its thread pools and GPU memory policy once, when its runtime starts:
the first TF model a process loads fixes them for every later one. This module sets
them before that first use: intra-op threads from ``options["threads"]`` (the worker's
``intra_op_threads``), inter-op threads at most 2, and GPU memory growth on, so one TF
model does not reserve the whole card and torch or ONNX Runtime models fit beside it in
the same worker process. Torch keeps its own pools (``torch.set_num_threads``): with
both frameworks in one process, set ``HETBATCH_INTRA_OP_THREADS`` so their sum fits
the cores.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from hetbatch.adapters.base import Adapter, ModelLoadError, Options, PredictError, TensorInfo, UnsafeArtifact

__all__ = ["SavedModelSignature", "TensorflowAdapter", "TensorflowOptions"]

log = logging.getLogger(__name__)

_configured: dict[str, int] = {}
_config_lock = threading.Lock()


def _configure_runtime(threads: int) -> None:
    """Set TF's process-wide knobs once, before its runtime starts (later calls only warn)."""
    with _config_lock:
        if "threads" in _configured:
            if threads and threads != _configured["threads"]:
                log.warning("TensorFlow threads stay at %s: set when the first TF model loaded", _configured["threads"])
            return
        _configured["threads"] = threads
        try:
            if threads > 0:
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                # Independent ops of one batch rarely gain from more; more would multiply threads.
                tf.config.threading.set_inter_op_parallelism_threads(min(threads, 2))
            for gpu in tf.config.list_physical_devices("GPU"):
                tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError as exc:  # TF was started by someone else in this process first
            log.warning("TensorFlow runtime already initialized; threads/memory growth unchanged: %s", exc)


def _info(name: str, spec: Any) -> TensorInfo:
    shape = spec.shape  # a tf.TensorShape (SavedModel) or a tuple (KerasTensor)
    dims = [None] if getattr(shape, "rank", 0) is None else list(shape)[1:]
    dtype = tf.as_dtype(spec.dtype).name
    dtype = "float32" if dtype == "bfloat16" else dtype  # handed back as float32: see _to_numpy
    return TensorInfo(name, dtype, tuple(d if isinstance(d, int) else None for d in dims))


def _to_numpy(value: Any) -> np.ndarray:
    arr = np.asarray(value.numpy() if hasattr(value, "numpy") else value)
    if arr.dtype.name == "bfloat16":  # an ml_dtypes extension type: Arrow cannot store it
        arr = arr.astype(np.float32)
    if arr.dtype.kind == "O":  # tf.string comes back as bytes; Arrow strings are text
        flat = [v.decode() if isinstance(v, bytes) else v for v in arr.ravel()]
        arr = np.array(flat, dtype=object).reshape(arr.shape)
    return arr


@dataclass(frozen=True)
class TensorflowOptions(Options):
    """TensorFlow options (``[options]`` of a tensorflow model; ``threads``: see the module).

    Attributes:
        signature: the SavedModel signature to serve.
        input_names: rename a ``.keras`` model's positional inputs, in order.
        output_names: rename a ``.keras`` model's outputs, in order.
    """

    signature: str = "serving_default"
    input_names: list[str] | None = None
    output_names: list[str] | None = None


class SavedModelSignature:
    """A SavedModel signature that keeps its SavedModel (and so its variables) alive;
    called with keyword arguments, one tensor per input."""

    def __init__(self, saved_model: Any, name: str) -> None:
        self.saved_model = saved_model
        self.function = saved_model.signatures[name]

    def __call__(self, **kwargs: Any) -> Any:
        return self.function(**kwargs)


class TensorflowAdapter(Adapter):
    """A SavedModel directory or a ``.keras`` file; options in ``TensorflowOptions``."""

    framework = "tensorflow"
    options_type = TensorflowOptions
    options: TensorflowOptions

    def _load(self) -> None:
        _configure_runtime(self.options.threads)
        if self.device == "gpu" and not tf.config.list_physical_devices("GPU"):
            raise ModelLoadError(
                f"{self.artifact.name} is a gpu model but TensorFlow sees no GPU (tensorflow {tf.__version__}, "
                "CUDA_VISIBLE_DEVICES?); it will not run on the CPU instead"
            )
        self.tf_device = "/GPU:0" if self.device == "gpu" else "/CPU:0"
        with tf.device(self.tf_device):
            if self.artifact.is_dir():
                self._load_saved_model()
            elif self.artifact.suffix == ".keras":
                self._load_keras()
            else:
                raise ModelLoadError(f"{self.artifact.name}: give a SavedModel directory or a .keras file")
        log.info("tensorflow model %s on %s", self.artifact.name, self.tf_device)

    def _load_saved_model(self) -> None:
        saved = tf.saved_model.load(str(self.artifact))
        name = self.options.signature
        if name not in saved.signatures:
            raise ModelLoadError(f"SavedModel has no signature {name!r}; it has {sorted(saved.signatures)}")
        self.model: Any = SavedModelSignature(saved, name)
        fn = self.model.function
        _, kwargs = fn.structured_input_signature
        self._inputs = [_info(n, s) for n, s in kwargs.items()]
        self._outputs = [_info(n, s) for n, s in fn.structured_outputs.items()]
        self._call: Callable[[dict[str, Any]], Any] = lambda tensors: fn(**tensors)

    def _load_keras(self) -> None:
        import keras

        if keras.backend.backend() != "tensorflow":
            raise ModelLoadError(f"keras runs on {keras.backend.backend()!r}; set KERAS_BACKEND=tensorflow")
        try:
            model = keras.saving.load_model(self.artifact, safe_mode=True, compile=False)
        except ValueError as exc:
            if "safe_mode" in str(exc):
                raise UnsafeArtifact(f"{self.artifact.name} holds Python code (e.g. a Lambda layer): {exc}") from exc
            raise
        try:
            structure = model.input
        except AttributeError:  # a Sequential model that was never called
            structure = list(model.inputs)
        if isinstance(structure, Mapping):
            names = [str(k) for k in structure]
            specs = list(structure.values())
        else:
            specs = list(model.inputs)
            default = [str(t.name) for t in specs]
            if len(default) == 1 and default[0].startswith("keras_tensor"):
                default = ["x"]  # an unnamed keras.Input: same default as the other adapters
            names = [str(n) for n in self.options.input_names or default]
        out_names = self.options.output_names or getattr(model, "output_names", None) or ["output"]
        if len(names) != len(specs) or len(out_names) != len(model.outputs):
            raise ModelLoadError(
                f"the model has {len(specs)} inputs and {len(model.outputs)} outputs; "
                f"options name {len(names)} and {len(out_names)}"
            )
        self._inputs = [_info(n, s) for n, s in zip(names, specs, strict=True)]
        self._outputs = [_info(str(n), s) for n, s in zip(out_names, model.outputs, strict=True)]
        signature = {
            i.name: tf.TensorSpec((None, *s.shape[1:]), s.dtype) for i, s in zip(self._inputs, specs, strict=True)
        }
        by_name = isinstance(structure, Mapping)

        # One traced graph for every batch size (batch axis None), not one per row count.
        @tf.function(input_signature=[signature], reduce_retracing=True)  # type: ignore[untyped-decorator]
        def call(tensors: dict[str, Any]) -> Any:
            args: Any = tensors if by_name else [tensors[i.name] for i in self._inputs]
            return model(args[0] if isinstance(args, list) and len(args) == 1 else args, training=False)

        self.model = model
        self._call = call

    def describe(self) -> tuple[list[TensorInfo], list[TensorInfo]]:
        return list(self._inputs), list(self._outputs)

    def _predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [i.name for i in self._inputs if i.name not in inputs]
        if missing:
            raise PredictError(f"missing inputs {missing}; the model takes {[i.name for i in self._inputs]}")
        with tf.device(self.tf_device):
            tensors = {i.name: tf.convert_to_tensor(inputs[i.name]) for i in self._inputs}
            result = self._call(tensors)
        names = [o.name for o in self._outputs]
        if isinstance(result, Mapping):
            return {str(k): _to_numpy(v) for k, v in result.items()}
        values = list(result) if isinstance(result, (list, tuple)) else [result]
        if len(values) != len(names):
            raise PredictError(f"the model returned {len(values)} outputs for the names {names}")
        return {n: _to_numpy(v) for n, v in zip(names, values, strict=True)}

    def unload(self) -> None:
        for name in ("model", "_call"):
            self.__dict__.pop(name, None)
        super().unload()
