"""ONNX Runtime models, on the CPU or the CUDA execution provider (TensorRT by option).

On ``gpu`` the session must come up on what was asked for: ONNX Runtime's own fallback
(rebuild the session on the next provider when one fails, at creation or at run time,
without our options) is disabled, and a session whose first provider is not the one
asked for is a load error. The CUDA libraries are preloaded from the ``nvidia-*`` wheels
(``onnxruntime.preload_dlls``) so the provider does not depend on torch having been
imported first.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from hetbatch.adapters.base import (
    Adapter,
    Capabilities,
    MissingFramework,
    ModelLoadError,
    Options,
    TensorInfo,
)

__all__ = [
    "OnnxAdapter",
    "OnnxOptions",
    "couples_rows",
    "cuda_provider_options",
    "session_providers",
    "trt_provider_options",
]

log = logging.getLogger(__name__)

_ONNX_DTYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int16)": "int16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
    "tensor(string)": "string",
}


# Ops whose output rows depend on the other rows of the call: dynamic quantization takes
# one scale over the whole input tensor (onnxruntime's quantize_dynamic inserts them).
_ROW_COUPLING_OPS = frozenset({"DynamicQuantizeLinear", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM"})
_CUDA, _TRT, _CPU = "CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"


def couples_rows(artifact: str | os.PathLike[str]) -> bool:
    """Whether the model's outputs for a row depend on the other rows of the same call
    (then a batch must be the caller's rows exactly: never merged with others, never cut)."""
    try:
        import onnx
    except ImportError:  # a runtime-only install: the worker cannot tell; assume independent rows
        return False
    graph = onnx.load(str(artifact), load_external_data=False).graph
    return any(node.op_type in _ROW_COUPLING_OPS for node in graph.node)


@dataclass(frozen=True)
class OnnxOptions(Options):
    """ONNX Runtime options (``[options]`` of an onnx model).

    Attributes:
        spin: let ORT's pool threads spin after each call (off: they would take the cores
            from the threads that decode and store the next jobs).
        graph_optimization: ORT's graph optimization level.
        tensorrt: on ``gpu``, run on the TensorRT provider (CUDA for what it lacks).
        arena_extend_strategy: CUDA arena growth; ``kSameAsRequested`` wastes least memory.
        gpu_mem_limit_bytes: cap on the CUDA arena, bytes (None: no cap).
        use_tf32: CUDA matmuls and convolutions in TF32 (ORT's default is on: about 1e-3
            relative error against float32; off for bit-closer outputs).
        trt_fp16: let TensorRT build float16 kernels.
        trt_cache_dir: directory for TensorRT's engine and timing caches (None: no cache,
            every worker start rebuilds the engines, which takes minutes).
        cuda_options: raw CUDA provider options, merged over the ones above.
        trt_options: raw TensorRT provider options, merged over the ones above.
    """

    spin: bool = False
    graph_optimization: Literal["all", "extended", "basic", "disabled"] = "all"
    tensorrt: bool = False
    arena_extend_strategy: Literal["kNextPowerOfTwo", "kSameAsRequested"] | None = None
    gpu_mem_limit_bytes: int | None = None
    use_tf32: bool | None = None
    trt_fp16: bool = False
    trt_cache_dir: str | None = None
    cuda_options: dict[str, Any] = field(default_factory=dict)
    trt_options: dict[str, Any] = field(default_factory=dict)


def cuda_provider_options(opts: OnnxOptions) -> dict[str, str]:
    """The CUDA provider's options for ``opts`` (ORT takes them as strings)."""
    # The batcher sends ever-changing batch sizes: cuDNN's default exhaustive algorithm
    # search would benchmark again for each new shape, so use its heuristic instead.
    cuda: dict[str, Any] = {"cudnn_conv_algo_search": "HEURISTIC"}
    if opts.arena_extend_strategy is not None:
        cuda["arena_extend_strategy"] = opts.arena_extend_strategy
    if opts.gpu_mem_limit_bytes is not None:
        cuda["gpu_mem_limit"] = opts.gpu_mem_limit_bytes
    if opts.use_tf32 is not None:
        cuda["use_tf32"] = int(opts.use_tf32)
    return {k: _option_text(v) for k, v in {**cuda, **opts.cuda_options}.items()}


def trt_provider_options(opts: OnnxOptions) -> dict[str, str]:
    """The TensorRT provider's options for ``opts``."""
    trt: dict[str, Any] = {"trt_fp16_enable": opts.trt_fp16}
    if opts.trt_cache_dir:
        trt |= {
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": opts.trt_cache_dir,
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": opts.trt_cache_dir,
        }
    if opts.gpu_mem_limit_bytes is not None:
        trt["trt_max_workspace_size"] = opts.gpu_mem_limit_bytes
    return {k: _option_text(v) for k, v in {**trt, **opts.trt_options}.items()}


def _option_text(value: Any) -> str:
    return ("1" if value else "0") if isinstance(value, bool) else str(value)


class OnnxAdapter(Adapter):
    """ONNX Runtime session of one ``.onnx`` file; options in ``OnnxOptions``.

    On ``gpu`` the CUDA provider is required (``pip install 'hetbatch[gpu]'``, which
    brings onnxruntime-gpu: uninstall the CPU ``onnxruntime`` first, both own the same
    module). Inputs are copied to the device and outputs back once per ``run``.
    """

    framework = "onnx"
    options_type = OnnxOptions
    options: OnnxOptions
    # A session owns its thread pool: one single-threaded session per core can be measured.
    CAPABILITIES: ClassVar[Capabilities] = Capabilities(calibrated_threads=True)

    @classmethod
    def capabilities(cls, artifact: str | os.PathLike[str]) -> Capabilities:
        return Capabilities(calibrated_threads=True, couples_rows=couples_rows(artifact))

    def _load(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise MissingFramework("onnxruntime", "onnx") from exc
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.options.threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.options.spin else "0")
        opts.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }[self.options.graph_optimization]
        if self.device == "gpu" and hasattr(ort, "preload_dlls"):
            # CUDA, cuDNN and the MSVC/cuBLAS libraries from the nvidia-* wheels; without
            # it the provider loads only if torch (which preloads them) was imported first.
            ort.preload_dlls()
        providers = self._providers(ort.get_available_providers())
        # enable_fallback=0: a provider that fails to come up is an error here, never a
        # session silently rebuilt on the CPU without our options.
        self.session = ort.InferenceSession(
            str(self.artifact), sess_options=opts, providers=providers, enable_fallback=0
        )
        self.session.disable_fallback()  # ... and never at run time either
        got = self.session.get_providers()
        wanted = self._wanted()
        if got[0] != wanted:
            raise ModelLoadError(
                f"{self.artifact.name}: {wanted} was asked for but the session runs on {got}; "
                "install a matched onnxruntime-gpu (pip install 'hetbatch[gpu]') and check the CUDA libraries"
            )
        log.info("onnx model %s runs on %s", self.artifact.name, got)
        for out in self.session.get_outputs():
            if not out.type.startswith("tensor("):
                raise ModelLoadError(
                    f"output {out.name!r} is {out.type}, not a tensor; for skl2onnx classifiers convert "
                    "with options={'zipmap': False}"
                )
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._shrink = False

    def _wanted(self) -> str:
        if self.device != "gpu":
            return _CPU
        return _TRT if self.options.tensorrt else _CUDA

    def _providers(self, available: list[str]) -> list[str | tuple[str, dict[str, str]]]:
        if self.device != "gpu":
            return [_CPU]
        wanted = self._wanted()
        if wanted not in available:
            raise ModelLoadError(
                f"{self.artifact.name}: {wanted} was asked for but this onnxruntime offers {available}; "
                "install onnxruntime-gpu (pip install 'hetbatch[gpu]', after uninstalling onnxruntime)"
            )
        chain: list[str | tuple[str, dict[str, str]]] = [(_CUDA, cuda_provider_options(self.options)), _CPU]
        if self.options.tensorrt:
            chain.insert(0, (_TRT, trt_provider_options(self.options)))
        return chain

    @property
    def provider(self) -> str:
        """The execution provider the session runs on first."""
        return str(self.session.get_providers()[0])

    def describe(self) -> tuple[list[TensorInfo], list[TensorInfo]]:
        def info(arg: Any) -> TensorInfo:
            shape = tuple(d if isinstance(d, int) else None for d in getattr(arg, "shape", [])[1:])
            return TensorInfo(str(arg.name), _ONNX_DTYPES.get(str(arg.type), "float32"), shape)

        return [info(i) for i in self.session.get_inputs()], [info(o) for o in self.session.get_outputs()]

    def _predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        run_options = None
        if self._shrink:
            import onnxruntime as ort

            # After an out-of-memory error, give the arena's free chunks back at the end of
            # the next run, so the retry (and torch or TF beside it) find the memory.
            run_options = ort.RunOptions()
            arena = "gpu:0" if self.device == "gpu" else "cpu:0"
            run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", arena)
            self._shrink = False
        results = self.session.run(self.output_names, dict(inputs), run_options)
        return dict(zip(self.output_names, (np.asarray(r) for r in results), strict=True))

    def release_memory(self) -> None:
        self._shrink = True

    def unload(self) -> None:
        self.__dict__.pop("session", None)
        super().unload()


def session_providers(path: str | Path, device: str = "cpu", **options: Any) -> list[str]:
    """The providers a session of ``path`` is active on (for checks and the GPU check script)."""
    adapter = OnnxAdapter(path, options=options, device=device)
    adapter.load()
    try:
        return list(adapter.session.get_providers())
    finally:
        adapter.unload()
