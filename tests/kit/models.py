"""Tiny real models, trained on data scikit-learn ships, written as registrable directories."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hetbatch.worker.modelops.config import write_config


@dataclass
class Built:
    """A model directory plus what the test needs to call the model in-process."""

    directory: Path
    model: Any
    X: np.ndarray
    y: np.ndarray | None = None


def sklearn_model(
    directory: Path, name: str, dataset: str = "iris", kind: str = "forest", trees: int = 25, **config: Any
) -> Built:
    import skops.io as sio
    from sklearn import datasets
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = getattr(datasets, f"load_{dataset}")(return_X_y=True)
    if kind == "forest":
        model: Any = RandomForestClassifier(n_estimators=trees, max_depth=8, random_state=0)
    else:
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(X, y)
    directory.mkdir(parents=True, exist_ok=True)
    sio.dump(model, directory / "model.skops")
    write_config(directory, name=name, framework="sklearn", artifact="model.skops", **config)
    return Built(directory, model, X, y)


def onnx_from_sklearn(directory: Path, name: str, built: Built, **config: Any) -> Built:
    """The same fitted estimator, converted with skl2onnx (float32 input, no ZipMap)."""
    import onnxruntime as ort
    from skl2onnx import to_onnx

    X32 = built.X.astype(np.float32)
    onx = to_onnx(built.model, X32[:1], options={"zipmap": False}, target_opset=17)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.onnx").write_bytes(onx.SerializeToString())
    write_config(directory, name=name, framework="onnx", artifact="model.onnx", **config)
    session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    return Built(directory, session, X32, built.y)


def onnx_mlp(
    directory: Path, name: str, features: int = 32, hidden: int = 256, classes: int = 10, **config: Any
) -> Built:
    """An ONNX MLP (features -> hidden -> hidden -> classes) built with onnx.helper."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    dims = [features, hidden, hidden, classes]
    nodes, inits, prev = [], [], "x"
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        inits += [
            numpy_helper.from_array((rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32), f"w{i}"),
            numpy_helper.from_array(np.zeros(b, np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
        ]
        prev = f"a{i}"
        if i < len(dims) - 2:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    nodes.append(helper.make_node("Softmax", [prev], ["probabilities"], axis=1))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(model, directory / "model.onnx")
    write_config(directory, name=name, framework="onnx", artifact="model.onnx", **config)
    session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    X = rng.standard_normal((1000, features)).astype(np.float32)
    return Built(directory, session, X)
