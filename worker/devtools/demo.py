"""``hetbatch demo``: the whole data path on one machine, then a summary.

Builds a scikit-learn forest and its ONNX conversion, registers both, starts a CPU
worker, scores a Parquet file through the queue with ``hetbatch run``, checks every
prediction against the same model called in-process, and stops what it started.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from hetbatch.producers.settings import ClientSettings
from hetbatch.worker.devtools.redis_server import RedisServer, redis_answers

__all__ = ["run_demo"]


def _build_models(root: Path) -> tuple[Any, list[str]]:
    import skops.io as sio
    from skl2onnx import to_onnx
    from sklearn.datasets import load_breast_cancer
    from sklearn.ensemble import RandomForestClassifier

    from hetbatch.worker.modelops.config import write_config

    data = load_breast_cancer()  # no as_frame: the demo needs no pandas
    features = [str(c).replace(" ", "_") for c in data.feature_names]
    X, y = data.data.astype(np.float32), data.target
    forest = RandomForestClassifier(n_estimators=50, max_depth=10, random_state=0).fit(X, y)
    (root / "forest").mkdir(parents=True, exist_ok=True)
    sio.dump(forest, root / "forest" / "model.skops")
    inputs = [{"name": "X", "dtype": "float32", "shape": [len(features)], "columns": features}]
    write_config(
        root / "forest",
        name="demo-forest",
        framework="sklearn",
        artifact="model.skops",
        options={"dtype": "float32"},
        inputs=inputs,
    )
    onx = to_onnx(forest, X[:1], options={"zipmap": False}, target_opset=17)
    (root / "forest-onnx").mkdir(parents=True, exist_ok=True)
    (root / "forest-onnx" / "model.onnx").write_bytes(onx.SerializeToString())
    write_config(root / "forest-onnx", name="demo-forest-onnx", framework="onnx", artifact="model.onnx", inputs=inputs)
    return forest, features


def _write_parquet(path: Path, features: list[str], rows: int) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_breast_cancer

    base = load_breast_cancer().data.astype(np.float32)
    rng = np.random.default_rng(42)
    noise = rng.normal(1.0, 0.05, (rows, base.shape[1])).astype(np.float32)
    X: np.ndarray = base[rng.integers(0, len(base), rows)] * noise
    columns = {"id": pa.array(np.arange(rows))} | {f: pa.array(X[:, j]) for j, f in enumerate(features)}
    pq.write_table(pa.table(columns), path, row_group_size=65_536)
    return X


def _inprocess_parquet(session: Any, root: Path, features: list[str]) -> float:
    """Seconds to do what ``hetbatch run`` does, in one process: read, predict, write."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    started = time.perf_counter()
    writer = None
    for batch in pq.ParquetFile(root / "input.parquet").iter_batches(batch_size=65_536):
        X = np.stack([batch.column(f).to_numpy() for f in features], axis=1)
        label, proba = session.run(None, {"X": X})
        probs = pa.FixedSizeListArray.from_arrays(pa.array(proba.ravel()), proba.shape[1])
        out = pa.table({"id": batch.column("id"), "label": label, "probabilities": probs})
        writer = writer or pq.ParquetWriter(root / "inprocess.parquet", out.schema)
        writer.write_table(out)
    if writer is not None:
        writer.close()
    return time.perf_counter() - started


def _start_worker(url: str, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, HETBATCH_REDIS_URL=url, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "hetbatch", "worker", "--pool", "cpu", "--loglevel", "INFO"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    deadline = time.monotonic() + 60
    while b" ready." not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the worker did not start; its log:\n{log.read_text()}")
        time.sleep(0.1)
    return proc


def run_demo(
    rows: int = 200_000, redis_url: str | None = None, workdir: str = ".demo", start_worker: bool = True
) -> int:
    """Run the demo; returns the process exit code. Without ``start_worker`` the workers
    already consuming this Redis do the work (they must see ``workdir`` at the same path)."""
    import onnxruntime as ort
    import pyarrow.parquet as pq

    from hetbatch.producers import Client
    from hetbatch.producers.dataset import RunOptions, run_dataset
    from hetbatch.worker.modelops.registration import build_spec

    root = Path(workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    url = redis_url or ClientSettings.from_env().redis_url
    server = None
    if not redis_answers(url):
        server = RedisServer()
        print(f"no Redis answered at {url}; started a private redis-server at {server.url}")
        url = server.url
    worker = None
    try:
        print("building example models (scikit-learn forest, and its ONNX conversion)...")
        forest, features = _build_models(root)
        with Client.from_url(url) as client:
            refs = [client.registry.register(build_spec(root / d)).ref for d in ("forest", "forest-onnx")]
        print(f"registered {', '.join(refs)}")
        X = _write_parquet(root / "input.parquet", features, rows)
        if start_worker:
            worker = _start_worker(url, root / "worker.log")
        with Client.from_url(url) as client:  # load the model on the worker, as in-process loads it first too
            client.predict("demo-forest-onnx", {"X": X[:8]}, timeout_s=120)
        print(f"workers up (log: {root / 'worker.log'}); scoring {rows:,} rows through queue onnx.cpu")
        started = time.perf_counter()
        with Client.from_url(url) as client:  # what 'hetbatch run --keep id' does
            run_dataset(RunOptions("demo-forest-onnx", (str(root / "input.parquet"),), str(root / "output.parquet"),
                                   keep=("id",)), client)  # fmt: skip
        queued_s = time.perf_counter() - started
        session = ort.InferenceSession(str(root / "forest-onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
        inproc_s = _inprocess_parquet(session, root, features)
        out = pq.read_table(root / "output.parquet")
        expected_label, expected_proba = session.run(None, {"X": X})
        got_label = out.column("label").to_numpy()
        got_proba = out.column("probabilities").combine_chunks().flatten().to_numpy().reshape(rows, -1)
        same = int((got_label == expected_label).sum())
        max_diff = float(np.abs(got_proba - expected_proba).max())
        native_agree = float((forest.predict(X[:20_000]) == got_label[:20_000]).mean())
        print()
        print("hetbatch demo summary")
        print(f"  rows scored               {rows:,} (model demo-forest-onnx, queue onnx.cpu)")
        queued_rate = rows / queued_s
        print(
            f"  hetbatch run (queue)      {queued_s:6.2f} s = {queued_rate:>10,.0f} rows/s  Parquet in -> Parquet out"
        )
        print(
            f"  same model in-process     {inproc_s:6.2f} s = {rows / inproc_s:>10,.0f} rows/s  same Parquet in and out"
        )
        print(f"  ratio queue / in-process  {inproc_s / queued_s:6.2f}")
        print(f"  labels equal in-process   {same:,}/{rows:,}; max |prob diff| {max_diff:.2e}")
        print(f"  agreement with sklearn    {native_agree:.4f} on 20,000 rows")
        ids = out.column("id").to_numpy()[:3]
        for i, row in enumerate(ids):
            print(f"  id={row} label={got_label[i]} probabilities={np.round(got_proba[i], 3).tolist()}")
        print(f"  output                    {root / 'output.parquet'}")
        return 0 if same == rows and max_diff <= 1e-6 else 1
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                worker.kill()
        if server is not None:
            server.stop()
