"""Benchmark fixtures: a private Redis, real worker processes, and the benchmarked models."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FEATURES = 32


@dataclass
class BenchModel:
    """A registered model and the same model callable in-process on named arrays."""

    name: str
    directory: Path
    call: Callable[[Mapping[str, np.ndarray]], Any]
    input_name: str


def start_process(
    argv: list[str], log: Path, env: Mapping[str, str], ready: bytes = b" ready."
) -> subprocess.Popen[bytes]:
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), **env)
    proc = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)
    deadline = time.monotonic() + 90
    while ready not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{argv} did not start:\n{log.read_text()}")
        time.sleep(0.1)
    return proc


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_worker(url: str, log: Path, *args: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "hetbatch", "worker", "--pool", "cpu", "--loglevel", "INFO", *args]
    return start_process(argv, log, {"HETBATCH_REDIS_URL": url})


def build_models(root: Path, names: list[str]) -> dict[str, BenchModel]:
    """Build each requested model under ``root`` (an ONNX MLP, a forest natively and as
    ONNX, a TorchScript MLP), all on FEATURES float32 inputs."""
    from hetbatch.worker.modelops.config import write_config
    from tests.kit.models import onnx_mlp

    out: dict[str, BenchModel] = {}
    if "onnx-mlp" in names:
        built = onnx_mlp(root / "onnx-mlp", "onnx-mlp", features=FEATURES)
        out["onnx-mlp"] = BenchModel("onnx-mlp", built.directory, lambda a, s=built.model: s.run(None, dict(a)), "x")
    if {"forest", "forest-onnx"} & set(names):
        import onnxruntime as ort
        import skops.io as sio
        from skl2onnx import to_onnx
        from sklearn.datasets import make_classification
        from sklearn.ensemble import RandomForestClassifier

        X, y = make_classification(n_samples=4000, n_features=FEATURES, n_informative=12, n_classes=4, random_state=0)
        forest = RandomForestClassifier(n_estimators=50, max_depth=10, random_state=0).fit(X.astype(np.float32), y)
        (root / "forest").mkdir(parents=True, exist_ok=True)
        sio.dump(forest, root / "forest" / "model.skops")
        write_config(
            root / "forest", name="forest", framework="sklearn", artifact="model.skops", options={"dtype": "float32"}
        )
        out["forest"] = BenchModel(
            "forest", root / "forest", lambda a, m=forest: (m.predict(a["X"]), m.predict_proba(a["X"])), "X"
        )
        onx = to_onnx(forest, X[:1].astype(np.float32), options={"zipmap": False}, target_opset=17)
        (root / "forest-onnx").mkdir(parents=True, exist_ok=True)
        (root / "forest-onnx" / "model.onnx").write_bytes(onx.SerializeToString())
        write_config(root / "forest-onnx", name="forest-onnx", framework="onnx", artifact="model.onnx")
        sess = ort.InferenceSession(str(root / "forest-onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
        out["forest-onnx"] = BenchModel(
            "forest-onnx", root / "forest-onnx", lambda a, s=sess: s.run(None, dict(a)), "X"
        )
    if "torch-mlp" in names and _has_torch_adapter():
        import torch

        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Linear(FEATURES, 256),
            torch.nn.ReLU(),
            torch.nn.Linear(256, 256),
            torch.nn.ReLU(),
            torch.nn.Linear(256, 10),
        ).eval()
        scripted = torch.jit.script(net)
        (root / "torch-mlp").mkdir(parents=True, exist_ok=True)
        scripted.save(str(root / "torch-mlp" / "model.pt"))
        write_config(
            root / "torch-mlp",
            name="torch-mlp",
            framework="torch",
            artifact="model.pt",
            inputs=[{"name": "input", "dtype": "float32", "shape": [FEATURES]}],
        )

        def call(a: Mapping[str, np.ndarray], m: Any = scripted) -> Any:
            with torch.inference_mode():
                return m(torch.from_numpy(np.ascontiguousarray(a["input"]))).numpy()

        out["torch-mlp"] = BenchModel("torch-mlp", root / "torch-mlp", call, "input")
    return out


def _has_torch_adapter() -> bool:
    return (ROOT / "adapters" / "torch.py").exists()
