"""The naive peer: what a user writes by hand with Celery, one task per row, JSON rows.

Started as its own Celery worker by the benchmark (``python -m bench.naive MODEL.onnx``)
with Celery's Redis result backend, as the Celery docs teach.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from celery import Celery

app = Celery(
    "naive",
    broker=os.environ.get("NAIVE_BROKER", "redis://127.0.0.1:6379/0"),
    backend=os.environ.get("NAIVE_BROKER", "redis://127.0.0.1:6379/0"),
)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    task_default_queue="naive",
    worker_hijack_root_logger=False,
)
_session: dict[str, Any] = {}


@app.task(name="naive.predict")
def predict(row: list[float]) -> list[float]:
    import numpy as np
    import onnxruntime as ort

    if "s" not in _session:
        _session["s"] = ort.InferenceSession(os.environ["NAIVE_MODEL"], providers=["CPUExecutionProvider"])
    sess = _session["s"]
    out = sess.run(None, {sess.get_inputs()[0].name: np.asarray([row], dtype=np.float32)})[0]
    return [float(v) for v in out[0]]


@app.task(name="naive.noop")
def noop() -> None:
    return None


if __name__ == "__main__":
    app.worker_main(["worker", "-P", "threads", "-c", "8", "-Q", "naive", "--loglevel", "INFO", *sys.argv[1:]])
