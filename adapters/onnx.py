"""ONNX Runtime models, on the CPU or CUDA (TensorRT by option) execution providers."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hetbatch.adapters.base import Adapter, MissingFramework, ModelLoadError, TensorInfo

__all__ = ["OnnxAdapter"]

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


def couples_rows(artifact: str | Path) -> bool:
    """Whether the model's outputs for a row depend on the other rows of the same call
    (then a batch must be the caller's rows exactly: never merged with others, never cut)."""
    try:
        import onnx
    except ImportError:  # a runtime-only install: the worker cannot tell; assume independent rows
        return False
    graph = onnx.load(str(artifact), load_external_data=False).graph
    return any(node.op_type in _ROW_COUPLING_OPS for node in graph.node)


class OnnxAdapter(Adapter):
    """Options: ``threads`` (intra-op threads, 0 = ORT default), ``tensorrt`` (bool),
    ``graph_optimization`` (``all``, ``extended``, ``basic``, ``disabled``),
    ``cuda_options`` (CUDA execution provider options, merged over ours).

    On ``gpu`` the CUDA provider is required (``pip install 'hetbatch[gpu]'``, which
    brings onnxruntime-gpu: uninstall the CPU ``onnxruntime`` first, both own the same
    module): a session that came up on the CPU instead is a load error, never a silent
    fallback. Inputs are copied to the device and outputs back once per ``run``.
    """

    framework = "onnx"

    def _load(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise MissingFramework("onnxruntime", "onnx") from exc
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(self.options.get("threads", 0))
        # ORT's pool threads spin after each call; in a worker they would take the cores
        # from the threads that decode and store the next jobs. Opt back in with spin = true.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.options.get("spin") else "0")
        level = str(self.options.get("graph_optimization", "all"))
        opts.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }[level]
        providers = self._providers(ort.get_available_providers())
        if self.options.get("tensorrt") and "TensorrtExecutionProvider" not in providers and self.device == "gpu":
            log.warning("TensorRT was asked for %s but this onnxruntime lacks it", self.artifact.name)
        self.session = ort.InferenceSession(str(self.artifact), sess_options=opts, providers=providers)
        got = self.session.get_providers()
        log.info("onnx model %s runs on %s", self.artifact.name, got[0])
        if self.device == "gpu" and "CUDAExecutionProvider" not in got:
            raise ModelLoadError(f"CUDA execution provider not available (got {got}); install hetbatch[gpu]")
        for out in self.session.get_outputs():
            if not out.type.startswith("tensor("):
                raise ModelLoadError(
                    f"output {out.name!r} is {out.type}, not a tensor; for skl2onnx classifiers convert "
                    "with options={'zipmap': False}"
                )
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _providers(self, available: list[str]) -> list[str | tuple[str, dict[str, Any]]]:
        if self.device != "gpu":
            return ["CPUExecutionProvider"]
        # The batcher sends ever-changing batch sizes: cuDNN's default exhaustive algorithm
        # search would benchmark again for each new shape, so use its heuristic instead.
        cuda = {"cudnn_conv_algo_search": "HEURISTIC", **dict(self.options.get("cuda_options") or {})}
        wanted: list[str | tuple[str, dict[str, Any]]] = [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
        if self.options.get("tensorrt"):
            wanted.insert(0, "TensorrtExecutionProvider")
        return [p for p in wanted if (p if isinstance(p, str) else p[0]) in available]

    @property
    def provider(self) -> str:
        return str(self.session.get_providers()[0])

    def describe(self) -> tuple[list[TensorInfo], list[TensorInfo]]:
        def info(arg: Any) -> TensorInfo:
            shape = tuple(d if isinstance(d, int) else None for d in getattr(arg, "shape", [])[1:])
            return TensorInfo(str(arg.name), _ONNX_DTYPES.get(str(arg.type), "float32"), shape)

        return [info(i) for i in self.session.get_inputs()], [info(o) for o in self.session.get_outputs()]

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.session.run(self.output_names, dict(inputs))
        return dict(zip(self.output_names, (np.asarray(r) for r in results), strict=True))

    def unload(self) -> None:
        self.__dict__.pop("session", None)
        super().unload()
