"""Models whose rows are big, whose outputs are big, or whose rows have variable length,
written as registrable directories (random weights: parity, not accuracy, is the point).

- ``image_cnn``: TorchScript CNN on (3, 224, 224) float32 images, 10 logits out.
- ``wide_output``: TorchScript, one float in, 65,536 floats (256 KiB) out per row.
- ``token_model``: embedding + per-token layer over token ids of any length: a ragged
  output ``hidden`` (length, 16) and a masked mean ``pooled`` (16,); TorchScript taking
  ``lengths``, or ONNX taking an ``attention_mask``.
- ``tiny_encoder``: a 2-layer transformer encoder, width 128 (the length-bucketing bench).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hetbatch.worker.modelops.registration import write_config

__all__ = ["ImageCNN", "TokenModel", "image_cnn", "run_rows_alone", "token_model", "tokens", "wide_output"]

VOCAB = 1000


class ImageCNN(nn.Module):
    """(N, 3, 224, 224) -> (N, 10); strided first layer: cheap enough for a CPU test."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 8, stride=8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(h.mean(dim=(2, 3)))


class WideOutput(nn.Module):
    """(N, 1) -> (N, 65536): each row its value times a ramp."""

    def __init__(self, width: int = 65_536) -> None:
        super().__init__()
        self.register_buffer("ramp", torch.linspace(-1.0, 1.0, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.ramp


class TokenModel(nn.Module):
    """Token ids (N, L) and a validity mask (N, L) -> hidden (N, L, 16), pooled (N, 16)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.layer = nn.Linear(16, 16)

    def encode(self, ids: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.tanh(self.layer(self.embed(ids)))
        weight = valid.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * weight).sum(1) / weight.sum(1).clamp(min=1.0)
        return hidden, pooled


class WithLengths(nn.Module):
    def __init__(self, core: TokenModel) -> None:
        super().__init__()
        self.core = core

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        valid = torch.arange(ids.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
        return self.core.encode(ids, valid)


class WithMask(nn.Module):
    def __init__(self, core: TokenModel) -> None:
        super().__init__()
        self.core = core

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.core.encode(ids, attention_mask > 0)


def image_cnn(directory: Path, name: str, **config: Any) -> tuple[Path, torch.jit.ScriptModule]:
    """The image CNN as TorchScript; returns the directory and the scripted module."""
    torch.manual_seed(0)
    scripted = torch.jit.trace(ImageCNN().eval(), torch.zeros(2, 3, 224, 224))
    directory.mkdir(parents=True, exist_ok=True)
    scripted.save(str(directory / "model.pt"))
    inputs = [{"name": "x", "dtype": "float32", "shape": [3, 224, 224]}]
    options = {"output_names": ["logits"]}
    write_config(directory, name=name, framework="torch", artifact="model.pt", inputs=inputs, options=options, **config)
    return directory, scripted


def wide_output(directory: Path, name: str) -> tuple[Path, torch.jit.ScriptModule]:
    """The 256-KiB-per-row output model as TorchScript."""
    scripted = torch.jit.trace(WideOutput().eval(), torch.zeros(2, 1))
    directory.mkdir(parents=True, exist_ok=True)
    scripted.save(str(directory / "model.pt"))
    inputs = [{"name": "x", "dtype": "float32", "shape": [1]}]
    options = {"output_names": ["wide"]}
    write_config(directory, name=name, framework="torch", artifact="model.pt", inputs=inputs, options=options)
    return directory, scripted


def token_model(directory: Path, name: str, framework: str, max_length: int | None = 300) -> tuple[Path, Any]:
    """The token model as TorchScript (``lengths`` input) or ONNX (``attention_mask``);
    returns the directory and a callable ``(ids (N, L), companion) -> (hidden, pooled)``."""
    torch.manual_seed(0)
    core = TokenModel().eval()
    directory.mkdir(parents=True, exist_ok=True)
    ids = torch.randint(0, VOCAB, (3, 7))
    ragged: dict[str, Any] = {"name": "ids", "dtype": "int64", "shape": [-1]}
    if max_length is not None:
        ragged["max_length"] = max_length
    if framework == "torch":
        module = torch.jit.trace(WithLengths(core), (ids, torch.tensor([7, 3, 1])))
        module.save(str(directory / "model.pt"))
        ragged["lengths"] = "lengths"
        artifact, options = "model.pt", {"output_names": ["hidden", "pooled"]}
        run: Any = module
    else:
        import onnxruntime as ort

        batch, length = torch.export.Dim("batch"), torch.export.Dim("length", min=1, max=4096)
        program = torch.onnx.export(
            WithMask(core).eval(),
            (ids, torch.ones(3, 7, dtype=torch.int64)),
            input_names=["ids", "attention_mask"],
            output_names=["hidden", "pooled"],
            dynamic_shapes={"ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}},
            dynamo=True,
            verbose=False,
        )
        assert program is not None
        program.save(str(directory / "model.onnx"))
        ragged["mask"] = "attention_mask"
        artifact, options = "model.onnx", {}
        session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
        run = session
    write_config(
        directory,
        name=name,
        framework=framework,
        artifact=artifact,
        inputs=[ragged],
        ragged_outputs=["hidden"],
        options=options,
    )
    return directory, run


def tokens(rows: int, low: int, high: int, seed: int = 0) -> list[np.ndarray]:
    """``rows`` token id sequences (int64) of random lengths in [low, high]."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, int(n)).astype(np.int64) for n in rng.integers(low, high + 1, rows)]


def run_rows_alone(run: Any, rows: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
    """The token model on each row alone, unpadded: (hidden per row, pooled (N, 16))."""
    hidden, pooled = [], []
    for row in rows:
        ids = row.reshape(1, -1)
        if isinstance(run, torch.jit.ScriptModule):
            with torch.inference_mode():
                h, p = run(torch.from_numpy(ids), torch.tensor([len(row)]))
            h, p = h.numpy(), p.numpy()
        else:
            h, p = run.run(["hidden", "pooled"], {"ids": ids, "attention_mask": np.ones_like(ids)})
        hidden.append(h[0])
        pooled.append(p[0])
    return hidden, np.stack(pooled)
