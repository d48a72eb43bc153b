"""Models whose rows are big, whose outputs are big, or whose rows have variable length,
written as registrable directories (random weights: parity, not accuracy, is the point).

- ``image_cnn``: TorchScript CNN on (3, 224, 224) float32 images, 10 logits out.
- ``wide_output``: TorchScript, one float in, 65,536 floats (256 KiB) out per row.
- ``token_model``: embedding + per-token layer over token ids of any length: a ragged
  output ``hidden`` (length, 16) and a masked mean ``pooled`` (16,); TorchScript taking
  ``lengths``, or ONNX taking an ``attention_mask``.
- ``tiny_encoder``: a 2-layer transformer encoder, width 128 (the length-bucketing bench).
- ``text_classifier``: a scikit-learn TF-IDF + logistic regression pipeline on a small
  made-up corpus (scikit-learn ships no text data set: 20 newsgroups is a download), as
  skops (string input ``X`` of shape ``()``) or its skl2onnx conversion (``text``, ``[None, 1]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hetbatch.worker.modelops.registration import write_config

__all__ = [
    "ImageCNN",
    "TokenModel",
    "corpus",
    "image_cnn",
    "run_rows_alone",
    "text_classifier",
    "token_model",
    "tokens",
    "wide_output",
]

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


def wide_output(directory: Path, name: str, width: int = 65_536) -> tuple[Path, torch.jit.ScriptModule]:
    """The wide-output model (``width`` float32 per row; 256 KiB by default) as TorchScript."""
    scripted = torch.jit.trace(WideOutput(width).eval(), torch.zeros(2, 1))
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


_TOPICS = {
    "pets": "cat dog kitten puppy leash vet fur purr bark yarn collar paw",
    "markets": "stock bond market shares yield investors earnings rally index trader dividend",
    "weather": "rain snow storm forecast sunny wind humid frost thunder cloudy drizzle",
}
TOKENS = r"[\p{L}\p{N}_][\p{L}\p{N}_]+"
"""scikit-learn's token pattern ``(?u)\\b\\w\\w+\\b`` for the converted tokenizer: skl2onnx
passes it on as it is, but ONNX Runtime's regex engine (RE2) reads ``\\w`` and ``\\b`` as
ASCII only, so "café" or "東京" would be split differently (probabilities off by up to
0.2 on such text); RE2's Unicode classes match what Python's ``\\w`` does."""
_FILLER = [
    "the",
    "a",
    "of",
    "on",
    "in",
    "and",
    "with",
    "this",
    "today",
    "very",
    "Über",
    "café",
    "naïve",
    "東京",
    "déjà-vu,",
    "!?",
    "42",
]


def corpus(rows: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``rows`` short documents and their topic labels: topic words mixed with filler
    (accents, CJK, punctuation, digits), casing varied, a few documents empty or filler only."""
    rng = np.random.default_rng(seed)
    names = sorted(_TOPICS)
    docs, labels = [], []
    for i in range(rows):
        label = names[int(rng.integers(len(names)))]
        words = list(rng.choice(_TOPICS[label].split(), int(rng.integers(0, 8))))
        words += list(rng.choice(_FILLER, int(rng.integers(0, 6))))
        rng.shuffle(words)
        text = " ".join(w.upper() if rng.random() < 0.1 else w for w in words)
        docs.append("" if i % 97 == 5 else text)
        labels.append(label)
    return docs, labels


def text_classifier(directory: Path, name: str, framework: str) -> tuple[Path, Any]:
    """The TF-IDF + logistic regression pipeline, fitted on ``corpus(400)``, as skops
    (``framework="sklearn"``) or ONNX; returns the directory and the in-process model
    (the fitted pipeline, or an ONNX Runtime session on the same file)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    docs, labels = corpus(400, seed=1)
    pipeline = make_pipeline(TfidfVectorizer(ngram_range=(1, 2)), LogisticRegression(max_iter=500))
    pipeline.fit(docs, labels)
    directory.mkdir(parents=True, exist_ok=True)
    if framework == "sklearn":
        import skops.io as sio

        sio.dump(pipeline, directory / "model.skops")
        # A text pipeline has no n_features_in_: the input is declared (one string per row).
        inputs = [{"name": "X", "dtype": "string", "shape": []}]
        write_config(directory, name=name, framework="sklearn", artifact="model.skops", inputs=inputs)
        return directory, pipeline
    import onnxruntime as ort
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import StringTensorType

    vectorizer, linear = pipeline.steps[0][1], pipeline.steps[1][1]
    onx = to_onnx(
        pipeline,
        initial_types=[("text", StringTensorType([None, 1]))],
        # ORT's StringNormalizer (lowercasing) builds its locale by name: en_US.UTF-8, the
        # converter's default, is missing from slim images; C.UTF-8 is always there.
        options={id(vectorizer): {"locale": "C.UTF-8", "tokenexp": TOKENS}, id(linear): {"zipmap": False}},
        target_opset=17,
    )
    (directory / "model.onnx").write_bytes(onx.SerializeToString())
    write_config(directory, name=name, framework="onnx", artifact="model.onnx")
    return directory, ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
