"""Optional peer: Ray Data ``map_batches`` on the same ONNX model and rows.

Runs only where Ray is installed (``pip install "ray[data]"``; not a hetbatch
dependency). The job mirrors hetbatch's large job: rows in, every output back in the
driver as one Arrow table; two actors with one onnxruntime thread each on two cores (the
configuration hetbatch's calibration picks for the same model), 4,096 rows per batch.
"""

from __future__ import annotations

import importlib.util
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def available() -> bool:
    return importlib.util.find_spec("ray") is not None


def ray_vs_inprocess(
    model: Path, X: np.ndarray, inprocess: Callable[[], float], repeats: int, batch: int = 4096
) -> tuple[float, float]:
    """(median Ray Data rows/s, median in-process rows/s), their repeats interleaved."""
    import pyarrow as pa
    import ray

    class Predict:
        def __init__(self) -> None:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            self.session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
            self.input = self.session.get_inputs()[0].name

        def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {"out": self.session.run(None, {self.input: rows["data"]})[0]}

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)

        def one_pass() -> float:
            started = time.perf_counter()
            ds = ray.data.from_numpy(X).map_batches(
                Predict,
                batch_size=batch,
                compute=ray.data.ActorPoolStrategy(size=2),
                num_cpus=1,
                batch_format="numpy",
            )
            table = pa.concat_tables(ray.get(ds.to_arrow_refs()))
            assert table.num_rows == len(X)
            return len(X) / (time.perf_counter() - started)

        one_pass()  # actors, workers and the object store warm up
        runs = [(one_pass(), inprocess()) for _ in range(repeats)]
    finally:
        ray.shutdown()
    return statistics.median(r for r, _ in runs), statistics.median(i for _, i in runs)
