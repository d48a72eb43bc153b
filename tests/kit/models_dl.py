"""Tiny real deep-learning models, trained on data scikit-learn ships, written as registrable
directories: a torch MLP (two inputs, two outputs), a torch CNN on the 8x8 digits images,
ONNX exports of both, and a Keras model with two named inputs and two named outputs.

Each builder returns the directory, the inputs it was checked on, and the outputs of the
saved artifact loaded back in this process: what the queue must reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hetbatch.adapters import sha256_of
from hetbatch.producers import Client
from hetbatch.worker.modelops.config import write_config

__all__ = [
    "MLP",
    "DLBuilt",
    "DigitsCNN",
    "cancer_inputs",
    "digits_images",
    "keras_two_inputs",
    "onnx_from_torch",
    "submit_unchecked",
    "torch_cnn",
    "torch_mlp",
]


@dataclass
class DLBuilt:
    """A model directory, inputs by name, and the saved artifact's own outputs on them."""

    directory: Path
    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]
    model: Any = None
    config: dict[str, Any] = field(default_factory=dict)


class MLP(nn.Module):
    """Features and a temperature in, (probabilities, logits) out. Importable by a worker as
    ``tests.kit.models_dl:MLP`` for state-dict artifacts."""

    def __init__(self, features: int = 30, hidden: int = 16, classes: int = 2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor, temperature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(x)
        return torch.softmax(logits / temperature, dim=1), logits


class DigitsCNN(nn.Module):
    """(N, 1, 8, 8) images in, class probabilities out."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = nn.functional.max_pool2d(torch.relu(self.conv(image)), 2)
        return torch.softmax(self.head(h.flatten(1)), dim=1)


def cancer_inputs() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Standardized breast-cancer features (float32) and a per-row temperature."""
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    X = ((X - X.mean(0)) / X.std(0)).astype(np.float32)
    temperature = np.linspace(0.5, 2.0, len(X), dtype=np.float32).reshape(-1, 1)
    return {"x": X, "temperature": temperature}, y


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """The 8x8 digits as (N, 1, 8, 8) float32 in [0, 1]."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return (X / 16.0).astype(np.float32).reshape(-1, 1, 8, 8), y


def _fit(model: nn.Module, args: tuple[torch.Tensor, ...], y: np.ndarray, steps: int = 60) -> None:
    torch.manual_seed(0)
    target = torch.from_numpy(y).long()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        out = model(*args)
        logits = out[1] if isinstance(out, tuple) else torch.log(out + 1e-9)
        nn.functional.cross_entropy(logits, target).backward()
        opt.step()
    model.eval()


def _run(model: Any, inputs: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        out = model(*(torch.from_numpy(a.copy()) for a in inputs.values()))
    outs = out if isinstance(out, tuple) else (out,)
    return {n: t.numpy() for n, t in zip(names, outs, strict=True)}


def torch_mlp(directory: Path, name: str, fmt: str = "torchscript", pin: bool = True, **config: Any) -> DLBuilt:
    """The MLP as TorchScript (``torchscript``) or a state dict plus ``options.module`` (``state_dict``)."""
    torch.manual_seed(0)
    inputs, y = cancer_inputs()
    model = MLP()
    _fit(model, (torch.from_numpy(inputs["x"]), torch.ones(len(y), 1)), y)
    directory.mkdir(parents=True, exist_ok=True)
    names = ["probabilities", "logits"]
    specs = [
        {"name": "x", "dtype": "float32", "shape": [30]},
        {"name": "temperature", "dtype": "float32", "shape": [1]},
    ]
    options: dict[str, Any] = {"output_names": names}
    if fmt == "torchscript":
        artifact = "model.pt"
        scripted = torch.jit.script(model)
        torch.jit.save(scripted, directory / artifact)
        loaded = torch.jit.load(directory / artifact)
    else:
        artifact = "weights.pt"
        torch.save(model.state_dict(), directory / artifact)
        options["module"] = "tests.kit.models_dl:MLP"
        loaded = model
    if pin and fmt != "torchscript":
        config.setdefault("sha256", sha256_of(directory / artifact))
    write_config(directory, name=name, framework="torch", artifact=artifact, options=options, inputs=specs, **config)
    if fmt != "torchscript":  # write_config has no inline tables; TOML lets a sub-table come later
        with open(directory / "model.toml", "a") as fh:
            fh.write("[options.module_kwargs]\nfeatures = 30\nhidden = 16\nclasses = 2\n")
    return DLBuilt(directory, inputs, _run(loaded, inputs, names), model, config)


def torch_cnn(directory: Path, name: str, **config: Any) -> DLBuilt:
    """The digits CNN as a ``torch.export`` program with a dynamic batch axis."""
    torch.manual_seed(0)
    images, y = digits_images()
    model = DigitsCNN()
    _fit(model, (torch.from_numpy(images[:500]),), y[:500], steps=15)  # a few steps: parity, not accuracy
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (torch.from_numpy(images[:4]),), dynamic_shapes={"image": {0: batch}})
    directory.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, directory / "model.pt2")
    options = {"output_names": ["probabilities"]}
    write_config(directory, name=name, framework="torch", artifact="model.pt2", options=options, **config)
    loaded = torch.export.load(directory / "model.pt2").module()
    inputs = {"image": images}
    return DLBuilt(directory, inputs, _run(loaded, inputs, ["probabilities"]), model, config)


def onnx_from_torch(directory: Path, name: str, built: DLBuilt, output_names: list[str], **config: Any) -> DLBuilt:
    """``built``'s torch model exported with ``torch.onnx.export`` (dynamo), batch axis dynamic."""
    import onnxruntime as ort

    batch = torch.export.Dim("batch")
    example = tuple(torch.from_numpy(a[:4].copy()) for a in built.inputs.values())
    program = torch.onnx.export(
        built.model,
        example,
        input_names=list(built.inputs),
        output_names=output_names,
        dynamic_shapes={n: {0: batch} for n in built.inputs},
        dynamo=True,
        verbose=False,
    )
    directory.mkdir(parents=True, exist_ok=True)
    assert program is not None
    program.save(str(directory / "model.onnx"))
    write_config(directory, name=name, framework="onnx", artifact="model.onnx", **config)
    session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    results = session.run(output_names, built.inputs)
    return DLBuilt(directory, built.inputs, dict(zip(output_names, results, strict=True)), session, config)


def keras_two_inputs(directory: Path, name: str, fmt: str = "keras", **config: Any) -> DLBuilt:
    """A Keras model on the digits: inputs ``image`` (8, 8) and ``extra`` (3,) (row mean, std,
    max), outputs ``probabilities`` (10,) and ``energy`` (1,); a ``.keras`` file or a SavedModel."""
    import keras

    images, y = digits_images()
    image = images.reshape(-1, 8, 8)
    flat = image.reshape(len(image), -1)
    extra = np.stack([flat.mean(1), flat.std(1), flat.max(1)], axis=1).astype(np.float32)
    keras.utils.set_random_seed(0)
    a = keras.Input((8, 8), name="image")
    b = keras.Input((3,), name="extra")
    h = keras.layers.Concatenate()([keras.layers.Flatten()(a), b])
    h = keras.layers.Dense(16, activation="relu")(h)
    outputs = {
        "probabilities": keras.layers.Dense(10, activation="softmax", name="probabilities")(h),
        "energy": keras.layers.Dense(1, name="energy")(h),
    }
    model = keras.Model({"image": a, "extra": b}, outputs)
    model.compile(optimizer="adam", loss={"probabilities": "sparse_categorical_crossentropy", "energy": "mse"})
    inputs = {"image": image, "extra": extra}
    model.fit(inputs, {"probabilities": y, "energy": y.astype(np.float32)}, epochs=2, batch_size=256, verbose=0)
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "keras":
        artifact = "model.keras"
        model.save(directory / artifact)
        loaded = keras.saving.load_model(directory / artifact, safe_mode=True, compile=False)
        result = loaded(inputs, training=False)
    else:
        import tensorflow as tf

        artifact = "saved_model"
        model.export(str(directory / artifact), verbose=False)
        fn = tf.saved_model.load(str(directory / artifact)).signatures["serving_default"]
        result = fn(**{k: tf.constant(v) for k, v in inputs.items()})
    write_config(directory, name=name, framework="tensorflow", artifact=artifact, **config)
    expected = {str(k): np.asarray(v) for k, v in result.items()}
    return DLBuilt(directory, inputs, expected, model, config)


def submit_unchecked(client: Client, model: str, table: Any) -> Any:
    """Submit ``table`` as-is, skipping the client's schema check: what a non-Python ETL
    producer writing Arrow by hand would send. Returns the Job."""
    check = client._prepare
    client._prepare = lambda spec, data, cast: data  # type: ignore[method-assign]
    try:
        return client.submit(model, table)
    finally:
        client._prepare = check  # type: ignore[method-assign]
