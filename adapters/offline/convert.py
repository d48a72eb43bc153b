"""Conversion of scikit-learn, PyTorch and TensorFlow/Keras models to ONNX, with parity.

``to_onnx`` loads the source artifact, exports it with the framework's converter
(skl2onnx, ``torch.onnx.export``, tf2onnx) keeping the source's input names, dtypes and
per-row shapes and its output names, with a dynamic batch axis; then it runs both in
process on a sample and refuses the result (deleting the file) when the parity report
fails, unless forced. Registration is the worker's job (``worker.modelops.adapt``): this module
imports no registry.

Which source artifacts load, and how, is ``adapters.loader``.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hetbatch.adapters.base import AdapterError, TensorInfo
from hetbatch.adapters.loader import load_predictor, onnx_predictor, tf_call
from hetbatch.adapters.offline.parity import ParityError, ParityReport, Tolerance, parity, sample_inputs

__all__ = ["ConversionResult", "ParityError", "to_onnx"]

OPSET = 17
_SKL_OUTPUTS = {"predict": "label", "predict_proba": "probabilities", "transform": "features"}


@dataclass(frozen=True)
class ConversionResult:
    """A converted model file and the parity report that admitted it.

    Attributes:
        path: the ``.onnx`` file written.
        parity: source versus converted on the sample.
        size_bytes: size of the written file.
    """

    path: Path
    parity: ParityReport
    size_bytes: int


def _skl_onnx(model: Any, inputs: Sequence[TensorInfo], outputs: Sequence[str]) -> Any:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import DoubleTensorType, FloatTensorType, Int64TensorType

    types = {"float64": DoubleTensorType, "float32": FloatTensorType, "int64": Int64TensorType}
    info = inputs[0]
    if len(inputs) != 1 or info.dtype not in types:
        raise AdapterError(f"scikit-learn models convert with one float32/float64/int64 input, not {inputs}")
    unsupported = [o for o in outputs if o not in _SKL_OUTPUTS.values()]
    if unsupported:
        raise AdapterError(f"outputs {unsupported} cannot be converted; use methods predict/predict_proba/transform")
    options = {id(model): {"zipmap": False}} if hasattr(model, "classes_") else None
    # Tree models compare float32(X) with their thresholds in scikit-learn; a float64
    # graph would flip splits near a threshold, so they get float32 after a Cast.
    dtype = "float32" if info.dtype == "float64" and _has_trees(model) else info.dtype
    try:
        onx = convert_sklearn(
            model,
            initial_types=[(info.name, types[dtype]([None, *info.shape]))],
            options=options,
            target_opset={"": OPSET, "ai.onnx.ml": 3},
        )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AdapterError(
            f"skl2onnx cannot convert {type(model).__name__} ({first}); keep serving it with the sklearn adapter"
        ) from exc
    produced = [o.name for o in onx.graph.output]
    # skl2onnx names a regressor's or transformer's single output "variable".
    default = "features" if "features" in outputs else "label"
    rename = {p: (p if p in ("label", "probabilities") else default) for p in produced}
    if dtype != info.dtype:
        _cast_input(onx, info.name)
    return _rename_outputs(onx, rename, outputs)


def _has_trees(model: Any) -> bool:
    if hasattr(model, "steps"):
        return any(_has_trees(step) for _, step in model.steps)
    return any(hasattr(model, a) for a in ("tree_", "estimators_", "_predictors"))


def _cast_input(model: Any, name: str) -> None:
    """Make float input ``name`` float64 at the graph's edge, cast to float32 inside."""
    from onnx import TensorProto, helper

    inner = f"{name}_float32"
    for node in model.graph.node:
        node.input[:] = [inner if i == name else i for i in node.input]
    model.graph.node.insert(0, helper.make_node("Cast", [name], [inner], to=TensorProto.FLOAT, name="cast_input"))
    for value in model.graph.input:
        if value.name == name:
            value.type.tensor_type.elem_type = TensorProto.DOUBLE


def _rename_outputs(model: Any, rename: Mapping[str, str], keep: Sequence[str]) -> Any:
    """Rename graph outputs through Identity nodes and drop the ones not kept."""
    from onnx import helper

    graph = model.graph
    kept = []
    for out in list(graph.output):
        new = rename.get(out.name, out.name)
        if new not in keep:
            continue
        if new != out.name:
            graph.node.append(helper.make_node("Identity", [out.name], [new], name=f"rename_{new}"))
            out.name = new
        kept.append(out)
    missing = [k for k in keep if k not in [o.name for o in kept]]
    if missing:
        raise AdapterError(f"the converted model has no output {missing}")
    del graph.output[:]
    graph.output.extend(sorted(kept, key=lambda o: list(keep).index(o.name)))
    return model


def _torch_onnx(model: Any, inputs: Sequence[TensorInfo], outputs: Sequence[str], example: Any) -> Any:
    import onnx
    import torch

    args = tuple(torch.from_numpy(np.ascontiguousarray(example[i.name][:2])) for i in inputs)
    names = [i.name for i in inputs]
    if isinstance(model, torch.jit.ScriptModule):
        # torch.export cannot trace TorchScript: the TorchScript exporter is the only route.
        axes = {n: {0: "batch"} for n in [*names, *outputs]}
        buffer = io.BytesIO()
        torch.onnx.export(
            model, args, buffer,  # type: ignore[arg-type]  # a file object is documented and works
            input_names=names, output_names=list(outputs), dynamic_axes=axes, opset_version=OPSET, dynamo=False,
        )  # fmt: skip
        return _check_batch_axis(onnx.load_from_string(buffer.getvalue()))
    module = model.module() if hasattr(model, "graph_signature") else model
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings():
        # An ExportedProgram's module reports training mode, but its graph is already fixed.
        warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
        program = torch.onnx.export(
            module, args, input_names=names, output_names=list(outputs), opset_version=18,
            dynamic_shapes=tuple({0: batch} for _ in names), dynamo=True, verbose=False,
        )  # fmt: skip
    if program is None:
        raise AdapterError("torch.onnx.export returned no program")
    return _check_batch_axis(program.model_proto)


def _check_batch_axis(model: Any) -> Any:
    """Refuse an export whose inputs kept the example's batch size."""
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            raise AdapterError(f"the export fixed the batch axis of input {value.name!r} at {dims[0].dim_value}")
    return model


def _tf_onnx(model: Any, inputs: Sequence[TensorInfo], outputs: Sequence[str]) -> Any:
    import tensorflow as tf
    import tf2onnx

    specs = [tf.TensorSpec((None, *i.shape), tf.as_dtype(i.dtype), name=i.name) for i in inputs]
    names = [i.name for i in inputs]

    @tf.function(input_signature=specs)  # type: ignore[untyped-decorator]
    def serve(*args: Any) -> dict[str, Any]:
        # Returning a dict names the ONNX outputs after the source's outputs.
        result = tf_call(model, dict(zip(names, args, strict=True)), inputs)
        if isinstance(result, Mapping):
            values = list(result.values()) if not all(o in result for o in outputs) else [result[o] for o in outputs]
        else:
            values = list(result) if isinstance(result, (list, tuple)) else [result]
        return dict(zip(outputs, values, strict=False))

    onx, _ = tf2onnx.convert.from_function(serve, input_signature=specs, opset=OPSET)
    return onx


def to_onnx(
    framework: str,
    artifact: str | os.PathLike[str],
    output: str | os.PathLike[str],
    inputs: Sequence[TensorInfo],
    outputs: Sequence[str],
    *,
    options: Mapping[str, Any] | None = None,
    sha256: str | None = None,
    pinned: bool = False,
    sample: Mapping[str, np.ndarray] | None = None,
    rtol: Tolerance = "auto",
    force: bool = False,
    source_name: str = "source",
) -> ConversionResult:
    """Convert a model to ONNX at ``output`` and check it against the source.

    Args:
        framework: ``sklearn``, ``torch`` or ``tensorflow``.
        inputs: the source's inputs (names, dtypes, per-row shapes), kept as they are.
        outputs: the source's output names, kept as they are.
        sample: input arrays for the parity check; generated from ``inputs`` if None.
        rtol: relative tolerance per float output ("auto": 1e-4 for float32).
        force: keep the converted model even when parity fails.

    Raises:
        ParityError: the converted model differs beyond tolerance (nothing is kept).
        AdapterError: the converter does not support the model.
        ModelLoadError, UnsafeArtifact: the source cannot be loaded.
    """
    model, source = load_predictor(framework, artifact, inputs, outputs, options=options, sha256=sha256, pinned=pinned)
    sample = dict(sample) if sample is not None else sample_inputs(inputs)
    if framework == "sklearn":
        onx = _skl_onnx(model, inputs, outputs)
    elif framework == "torch":
        onx = _torch_onnx(model, inputs, outputs, sample)
    elif framework == "tensorflow":
        onx = _tf_onnx(model, inputs, outputs)
    else:
        raise AdapterError(f"cannot convert {framework!r} models to ONNX; supported: sklearn, torch, tensorflow")
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(onx.SerializeToString())
    try:
        report = parity(
            source, onnx_predictor(path), sample, outputs,
            source_name=f"{source_name} ({framework})", candidate_name=f"{path.name} (onnx)", rtol=rtol,
        )  # fmt: skip
    except Exception:
        path.unlink(missing_ok=True)
        raise
    if not report.ok and not force:
        path.unlink(missing_ok=True)
        raise ParityError(f"{source_name}: the ONNX conversion does not reproduce the source; not kept", report)
    return ConversionResult(path, report, path.stat().st_size)
