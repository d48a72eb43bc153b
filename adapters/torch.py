"""PyTorch models: TorchScript, ``torch.export`` programs, or a pinned state dict.

Artifacts, by what the file holds (not by its suffix):

- TorchScript (``torch.jit.save``, usually ``.pt``/``.ts``): code runs in the TorchScript
  interpreter, no Python pickle is executed.
- ``torch.export`` programs (``torch.export.save``, ``.pt2``): export with a dynamic batch
  axis (``torch.export.Dim``), the batcher sends varying row counts.
- A state dict (``torch.save(model.state_dict())``) plus ``options.module =
  "pkg.mod:Class"`` and ``options.module_kwargs``: pickle-based, and importing the class
  runs code, so it is loaded only when the config pins the artifact's sha256. The
  weights are read with ``torch.load(weights_only=True)`` all the same.

Placement rewrites the graph, not only the weights: an exported program is moved with
``torch.export.passes.move_to_device_pass`` (``.module().to(device)`` would leave
``device=cpu`` baked into its graph's ops), TorchScript is loaded with ``map_location``.
What still cannot run on the device fails the warm-up call at load. Float outputs
come back in the dtype the program declares (bfloat16, which numpy lacks, as float32).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hetbatch.adapters.base import Adapter, ModelLoadError, Options, PredictError, TensorInfo

__all__ = ["TorchAdapter", "TorchOptions", "place_program"]

log = logging.getLogger(__name__)


def _archive_kind(path: Any) -> str:
    """``export``, ``torchscript`` or ``pickle`` from the zip's entries; ``unknown`` otherwise."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return "unknown"
    if any(n.endswith("/archive_format") for n in names):
        return "export"
    if any("/code/" in n for n in names):
        return "torchscript"
    if any(n.endswith("data.pkl") for n in names):
        return "pickle"
    return "unknown"


def _dtype_name(dtype: torch.dtype) -> str:
    # numpy has no bfloat16: such outputs are handed back as float32.
    return "float32" if dtype == torch.bfloat16 else str(dtype).removeprefix("torch.")


def place_program(program: Any, device: torch.device) -> Any:
    """An exported program's module on ``device``, with the devices in its graph rewritten.

    ``program.module().to(device)`` moves parameters and buffers only; tensors the graph
    creates (``torch.ones(..., device="cpu")``) would stay where they were traced.
    """
    if device.type != "cpu":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)
    return program.module()


@dataclass(frozen=True)
class TorchOptions(Options):
    """PyTorch options (``[options]`` of a torch model).

    Attributes:
        input_names: the model's inputs in ``forward`` order (default: the ``forward``
            argument names, else ``["x"]``).
        output_names: its outputs in order (default ``["output"]``, or ``output_<i>``).
        module: ``"pkg.mod:Class"`` (a class or factory) for a state-dict artifact.
        module_kwargs: keyword arguments of ``module``.

    ``threads`` sets ``torch.set_num_threads``, which is process-wide: the last model
    loaded with ``threads > 0`` sets it for every torch model in the worker.
    """

    input_names: list[str] | None = None
    output_names: list[str] | None = None
    module: str | None = None
    module_kwargs: dict[str, Any] = field(default_factory=dict)


def _to_numpy(tensor: torch.Tensor, declared: str | None) -> np.ndarray:
    """One device-to-host copy; float outputs in the declared dtype (bfloat16 as float32)."""
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    arr = tensor.detach().cpu().numpy()  # shares the CPU tensor's memory
    if declared is not None and arr.dtype.kind == "f" and arr.dtype.name != declared:
        arr = arr.astype(declared)
    return arr


class TorchAdapter(Adapter):
    """A TorchScript, ``torch.export`` or state-dict model; options in ``TorchOptions``."""

    framework = "torch"
    options_type = TorchOptions
    options: TorchOptions

    def is_pickle(self) -> bool:
        return bool(self.options.module) or _archive_kind(self.artifact) == "pickle"

    def _load(self) -> None:
        threads = self.options.threads
        if threads > 0:
            torch.set_num_threads(threads)
        if self.device == "gpu":
            if not torch.cuda.is_available():
                raise ModelLoadError(
                    f"{self.artifact.name} is a gpu model but torch sees no CUDA device "
                    f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES?); it will not run on the CPU instead"
                )
            self.torch_device = torch.device("cuda")
        else:
            self.torch_device = torch.device("cpu")
        self._output_infos: list[TensorInfo] | None = None
        kind = "state_dict" if self.options.module else _archive_kind(self.artifact)
        if kind == "export":
            self.model: Any = self._load_export()
        elif kind == "torchscript":
            load_script: Any = torch.jit.load  # untyped in torch's stubs
            self.model = load_script(str(self.artifact), map_location=self.torch_device).eval()
            names = [a.name for a in self.model.forward.schema.arguments[1:]]
            self.input_names = self._names("input_names", names or ["x"])
        elif kind == "state_dict":
            self.model = self._load_state_dict()
        elif kind == "pickle":
            raise ModelLoadError(
                f"{self.artifact.name} is a torch.save pickle: give options.module = 'pkg.mod:Class' (and "
                "options.module_kwargs) for a state dict, or save the model with torch.jit.save or torch.export.save"
            )
        else:
            raise ModelLoadError(
                f"{self.artifact.name} is neither TorchScript (torch.jit.save) nor a torch.export program (.pt2)"
            )
        # Serving never needs gradients; a TorchScript module that was also traced (e.g. by
        # the ONNX exporter) would otherwise refuse inference-mode inputs for its saved state.
        for param in self.model.parameters():
            param.requires_grad_(False)
        count = 1 if self._output_infos is None else len(self._output_infos)
        self.output_names = self._names(
            "output_names", ["output"] if count == 1 else [f"output_{i}" for i in range(count)]
        )
        log.info("torch model %s (%s) on %s", self.artifact.name, kind, self.torch_device)

    def _names(self, option: str, default: Sequence[str]) -> list[str]:
        names = getattr(self.options, option)
        return [str(n) for n in names] if names else list(default)

    def _load_export(self) -> Any:
        program = torch.export.load(str(self.artifact))
        placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
        infos = []
        for name in program.graph_signature.user_inputs:
            val = placeholders[str(name)].meta.get("val") if str(name) in placeholders else None
            if val is None:
                continue
            shape = tuple(d if isinstance(d, int) else None for d in val.shape)
            if shape[:1] != (None,):
                raise ModelLoadError(
                    f"{self.artifact.name}: input {name!r} has a fixed batch size {shape[:1]}; export it with "
                    "dynamic_shapes={...: {0: torch.export.Dim('batch')}} so the batcher can vary the rows"
                )
            infos.append(TensorInfo(str(name), _dtype_name(val.dtype), shape[1:]))
        self.input_names = self._names("input_names", [i.name for i in infos] or ["x"])
        if len(infos) == len(self.input_names):  # options.input_names renames them in order
            infos = [TensorInfo(n, i.dtype, i.shape) for n, i in zip(self.input_names, infos, strict=True)]
        self._input_infos = infos
        out_node = next(n for n in program.graph.nodes if n.op == "output")
        vals = {getattr(a, "name", ""): a.meta.get("val") for a in out_node.args[0] if hasattr(a, "meta")}
        self._output_infos = [
            TensorInfo(str(n), _dtype_name(vals[n].dtype) if vals.get(n) is not None else "float32")
            for n in program.graph_signature.user_outputs
        ]
        return place_program(program, self.torch_device)

    def _load_state_dict(self) -> Any:
        target = str(self.options.module)
        module_name, _, class_name = target.partition(":")
        if not class_name:
            raise ModelLoadError(f"options.module must be 'package.module:Class', not {target!r}")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as exc:
            raise ModelLoadError(f"cannot import the model class {target!r} on this worker: {exc}") from exc
        model = cls(**self.options.module_kwargs)
        state = torch.load(str(self.artifact), map_location="cpu", weights_only=True)
        if not isinstance(state, Mapping):
            raise ModelLoadError(f"{self.artifact.name} holds a {type(state).__name__}, not a state dict")
        model.load_state_dict(state, strict=True)
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        params = [p.name for p in inspect.signature(model.forward).parameters.values() if p.kind in positional]
        self.input_names = self._names("input_names", params or ["x"])
        return model.eval().to(self.torch_device)

    def describe(self) -> tuple[list[TensorInfo], list[TensorInfo]]:
        known = {i.name: i for i in getattr(self, "_input_infos", [])}
        # TorchScript and state dicts do not say their shapes: the config's [[inputs]] must.
        inputs = [known.get(n, TensorInfo(n, "float32", (None,))) for n in self.input_names]
        dtypes = [i.dtype for i in self._output_infos] if self._output_infos else []
        if len(dtypes) != len(self.output_names):
            dtypes = ["float32"] * len(self.output_names)
        return inputs, [TensorInfo(n, d) for n, d in zip(self.output_names, dtypes, strict=True)]

    def _tensor(self, name: str, arr: np.ndarray) -> torch.Tensor:
        if arr.dtype.kind in "OUS":
            raise PredictError(f"input {name!r}: torch takes no string tensors ({arr.dtype})")
        arr = np.ascontiguousarray(arr)
        if arr.flags.writeable:
            return torch.from_numpy(arr).to(self.torch_device)
        # Arrow hands over a read-only view of the task's own payload bytes. torch.as_tensor
        # would share it just the same (and warn), a copy would cost a pass over every row.
        # On the GPU the host tensor is only read by the copy to the device. On the CPU the
        # model reads it under inference_mode; a model that wrote into its own input would
        # only change this task's private payload, never another job's or the stored one.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(arr).to(self.torch_device)

    def _predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            args = [self._tensor(n, inputs[n]) for n in self.input_names]
        except KeyError as exc:
            raise PredictError(f"missing input {exc}; the model takes {self.input_names}") from exc
        with torch.inference_mode():
            return self._outputs(self.model(*args))

    def _outputs(self, result: Any) -> dict[str, np.ndarray]:
        if isinstance(result, torch.Tensor):
            result = (result,)
        if isinstance(result, Mapping):
            names = self.output_names if set(self.output_names) <= set(result) else list(result)
            tensors = [result[n] for n in names]
        else:
            tensors = list(result)
            names = self.output_names
            if len(tensors) != len(names):
                raise PredictError(
                    f"the model returned {len(tensors)} outputs, options.output_names names {len(names)}: {names}"
                )
        declared = {i.name: i.dtype for i in self._output_infos or []}
        return {n: _to_numpy(t, declared.get(n)) for n, t in zip(names, tensors, strict=True)}

    def release_memory(self) -> None:
        if getattr(self, "torch_device", None) is not None and self.torch_device.type == "cuda":
            torch.cuda.empty_cache()

    def unload(self) -> None:
        self.__dict__.pop("model", None)
        if getattr(self, "torch_device", None) is not None and self.torch_device.type == "cuda":
            torch.cuda.empty_cache()
        super().unload()
