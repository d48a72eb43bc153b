"""``make bench-rows``: big rows, big outputs and ragged token sequences, hetbatch against
the same model in-process, side by side in one run (a private redis-server, one real
worker process, TorchScript models with random weights).

(a) two image CNNs on (N, 3, 224, 224) float32, one job of every image: a patchify CNN
    that runs faster than a copy of its input (transfer-bound: the floor) and ConvNet,
    four strided 3x3 convolutions (about 0.1 GFLOP per image);
(b) a 2-layer transformer encoder (width 128) over token sequences of lengths 8-256:
    hetbatch (length-aware batching, 64 rows per call) vs in-process padding each
    64-row batch to its longest row, and vs padding every row to 256;
(c) an embedding model, 768 floats out per row (inputs and results through shared-memory
    files when the worker shares ``/dev/shm``, as here: ``Transport.place_result``).

Medians and ranges of ``--repeats`` runs, the sides taken in turns; ratios are of the
medians. Writes ``.bench/rowsize.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.setup import ROOT, start_worker, stop_process
from hetbatch.producers import Client
from hetbatch.worker.devtools.redis_server import RedisServer
from hetbatch.worker.modelops.config import write_config
from hetbatch.worker.modelops.registration import build_spec
from hetbatch.worker.ragged import RaggedCall


class ImageCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 8, stride=8)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean(dim=(2, 3)))


class ConvNet(nn.Module):
    """Four 3x3 stride-2 convolutions (16-128 channels), about 0.1 GFLOP per 224x224 image:
    lighter than any ImageNet classifier (MobileNetV2 0.3, ResNet-18 1.8), heavy enough
    that the model, not the copy of its 602 KB rows, sets the pace."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 8 * width]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in itertools.pairwise(chans))
        self.head = nn.Linear(8 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = torch.relu(conv(x))
        return self.head(x.mean(dim=(2, 3)))


class Encoder(nn.Module):
    """Token ids (N, L) and lengths (N,) -> masked mean of a 2-layer encoder's states (N, 128)."""

    def __init__(self, vocab: int = 1000, width: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, 4, 256, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        valid = torch.arange(ids.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
        h = self.encoder(self.embed(ids), src_key_padding_mask=~valid)
        w = valid.to(h.dtype).unsqueeze(-1)
        return (h * w).sum(1) / w.sum(1)


class Embedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 768)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(x))


def save(directory: Path, name: str, module: nn.Module, example: tuple[torch.Tensor, ...], **config: Any) -> Any:
    torch.manual_seed(0)
    traced = torch.jit.trace(module.eval(), example, check_trace=False)
    directory.mkdir(parents=True, exist_ok=True)
    traced.save(str(directory / "model.pt"))
    write_config(directory, name=name, framework="torch", artifact="model.pt", **config)
    return traced


def timed(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each of ``fns`` per repeat, taken in turns (a, b, a, b...): a slow
    spell of this shared machine falls on both sides alike, not on one side's runs."""
    for fn in fns.values():
        fn()  # warm (model load on the worker, allocator in-process)
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - started)
    return out


def summary(rows: int, seconds: list[float]) -> dict[str, float]:
    rates = sorted(rows / s for s in seconds)
    return {"median": statistics.median(rates), "low": rates[0], "high": rates[-1]}


def padded_calls(model: Any, seqs: list[np.ndarray], batch: int, to: int | None) -> float:
    """In-process: ``batch`` rows per call padded to their longest (or to ``to``); returns
    the padded fraction."""
    padded_total = real = 0
    with torch.inference_mode():
        for start in range(0, len(seqs), batch):
            part = seqs[start : start + batch]
            lengths = np.array([len(s) for s in part])
            longest = to or int(lengths.max())
            ids = np.zeros((len(part), longest), np.int64)
            for i, s in enumerate(part):
                ids[i, : len(s)] = s
            model(torch.from_numpy(ids), torch.from_numpy(lengths))
            real += int(lengths.sum())
            padded_total += len(part) * longest
    return 1 - real / padded_total


def worker_padding(spec: Any, seqs: list[np.ndarray], gathered: int = 8192) -> float:
    """The padded fraction of the worker's calls on ``seqs`` (one task): its batcher hands
    the ragged call pieces of ``gathered`` rows, which groups each by length."""

    def count(inputs: Any) -> dict[str, np.ndarray]:
        return {"pooled": np.zeros((len(inputs["ids"]), 1), np.float32)}

    call = RaggedCall(count, spec, max_rows=spec.max_batch_rows, max_bytes=64 << 20)
    real = total = 0.0
    for start in range(0, len(seqs), gathered):
        col = np.empty(len(seqs[start : start + gathered]), dtype=object)
        col[:] = [None] * len(col)
        for i, s in enumerate(seqs[start : start + gathered]):
            col[i] = s
        call({"ids": col})
        frac = call.take_padded_fraction() or 0.0
        rows_real = sum(len(s) for s in seqs[start : start + gathered])
        real += rows_real
        total += rows_real / (1 - frac)
    return 1 - real / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--sequences", type=int, default=20_000)
    ap.add_argument("--embeddings", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cases", default="abc", help="which of the cases a, b, c to run (default all)")
    args = ap.parse_args()
    out_dir = ROOT / ".bench"
    out_dir.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    server = RedisServer()
    worker = start_worker(server.url, out_dir / "rowsize-worker.log", "--queues", "torch.cpu")
    client = Client.from_url(server.url)
    results: dict[str, Any] = {}
    try:
        if "a" in args.cases:
            bench_images(client, out_dir, rng, args, results)
        if "b" in args.cases:
            bench_tokens(client, out_dir, rng, args, results)
        if "c" in args.cases:
            bench_embeddings(client, out_dir, rng, args, results)
    finally:
        client.close()
        stop_process(worker)
        server.stop()
    ratios = {}
    for key in ("a_images", "a_convnet"):
        if key in results:
            ratios[f"{key}_vs_in_process"] = results[key]["hetbatch"]["median"] / results[key]["in_process"]["median"]
    if "b_tokens" in results:
        b = results["b_tokens"]
        ratios["b_tokens_vs_pad_per_64"] = b["hetbatch"]["median"] / b["in_process_pad_per_64"]["median"]
        ratios["b_tokens_vs_pad_to_256"] = b["hetbatch"]["median"] / b["in_process_pad_to_256"]["median"]
    if "c_embeddings" in results:
        c = results["c_embeddings"]
        ratios["c_embeddings_vs_in_process"] = c["hetbatch"]["median"] / c["in_process"]["median"]
    results["ratios"] = {k: round(v, 2) for k, v in ratios.items()}
    (out_dir / "rowsize.json").write_text(json.dumps(results, indent=2))
    for name, row in results.items():
        print(name, json.dumps(row, default=lambda v: round(v, 1)))


def bench_images(client: Client, out_dir: Path, rng: np.random.Generator, args: Any, results: dict[str, Any]) -> None:
    """(a) one job of ``args.images`` images through each CNN: the patchify one (a copy of
    the input costs more than the model: the floor of any out-of-process server) and ConvNet."""
    X = rng.standard_normal((args.images, 3, 224, 224), dtype=np.float32)
    for key, name, module in (("a_images", "bench-cnn", ImageCNN()), ("a_convnet", "bench-convnet", ConvNet())):
        model = save(
            out_dir / f"m-{name}",
            name,
            module,
            (torch.zeros(2, 3, 224, 224),),
            inputs=[{"name": "x", "dtype": "float32", "shape": [3, 224, 224]}],
        )
        client.registry.register(build_spec(out_dir / f"m-{name}"))

        def inproc(model: Any = model) -> None:
            with torch.inference_mode():
                for s in range(0, len(X), 64):
                    model(torch.from_numpy(X[s : s + 64]))

        queued = lambda name=name: client.predict(name, {"x": X}, timeout_s=900)  # noqa: E731
        runs = timed({"in": inproc, "hb": queued}, args.repeats)
        a_in, a_hb = summary(len(X), runs["in"]), summary(len(X), runs["hb"])
        results[key] = {"rows": len(X), "MB": round(X.nbytes / 1e6), "in_process": a_in, "hetbatch": a_hb}


def bench_tokens(client: Client, out_dir: Path, rng: np.random.Generator, args: Any, results: dict[str, Any]) -> None:
    """(b) ragged token sequences through a transformer encoder."""
    enc = save(
        out_dir / "m-enc",
        "bench-encoder",
        Encoder(),
        (torch.zeros(2, 9, dtype=torch.int64), torch.tensor([9, 4])),
        inputs=[{"name": "ids", "dtype": "int64", "shape": [-1], "max_length": 256, "lengths": "lengths"}],
        max_batch_rows=64,
    )
    client.registry.register(build_spec(out_dir / "m-enc"))
    seqs = [rng.integers(1, 1000, int(n)).astype(np.int64) for n in rng.integers(8, 257, args.sequences)]
    pad64 = padded_calls(enc, seqs[:64], 64, None)
    runs = timed(
        {
            "64": lambda: padded_calls(enc, seqs, 64, None),
            "256": lambda: padded_calls(enc, seqs, 64, 256),
            "hb": lambda: client.predict("bench-encoder", {"ids": seqs}, timeout_s=900),
        },
        args.repeats,
    )
    b_64, b_256, b_hb = (summary(len(seqs), runs[k]) for k in ("64", "256", "hb"))
    pad_all = padded_calls(enc, seqs[:640], 64, None)
    results["b_tokens"] = {
        "rows": len(seqs),
        "hetbatch": b_hb,
        "in_process_pad_per_64": b_64,
        "in_process_pad_to_256": b_256,
        "padded_fraction_pad_per_64": round(pad_all, 3),
        "padded_fraction_pad_to_256": round(1 - float(np.mean([len(s) for s in seqs])) / 256, 3),
        "first_batch_padded_fraction": round(pad64, 3),
        "padded_fraction_hetbatch": round(worker_padding(client.spec("bench-encoder"), seqs), 3),
    }


def bench_embeddings(
    client: Client, out_dir: Path, rng: np.random.Generator, args: Any, results: dict[str, Any]
) -> None:
    """(c) embeddings: 768 floats out per row."""
    save(
        out_dir / "m-emb",
        "bench-embed",
        Embedder(),
        (torch.zeros(2, 64),),
        inputs=[{"name": "x", "dtype": "float32", "shape": [64]}],
    )
    client.registry.register(build_spec(out_dir / "m-emb"))
    emb = torch.jit.load(str(out_dir / "m-emb" / "model.pt"))
    E = rng.standard_normal((args.embeddings, 64), dtype=np.float32)

    def emb_inproc() -> np.ndarray:
        with torch.inference_mode():
            return np.concatenate([emb(torch.from_numpy(E[s : s + 8192])).numpy() for s in range(0, len(E), 8192)])

    runs = timed({"in": emb_inproc, "hb": lambda: client.predict("bench-embed", {"x": E}, timeout_s=900)}, args.repeats)
    c_in, c_hb = summary(len(E), runs["in"]), summary(len(E), runs["hb"])
    # The results must be the in-process ones, bit for bit (files read back, not re-encoded).
    got = client.predict("bench-embed", {"x": E}, timeout_s=900).column(0).combine_chunks()
    same = got.flatten().to_numpy().reshape(len(E), -1).view(np.uint32)
    results["c_embeddings"] = {
        "rows": len(E),
        "out_MB": round(len(E) * 768 * 4 / 1e6),
        "in_process": c_in,
        "hetbatch": c_hb,
        "bitwise_equal": bool(np.array_equal(same, emb_inproc().view(np.uint32))),
    }


if __name__ == "__main__":
    main()
