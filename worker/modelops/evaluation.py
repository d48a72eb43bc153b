"""``hetbatch ensembles evaluate``: score each member of a select ensemble on labelled
data and record the winner (and every member's score) as the ensemble's next version.

Members are scored through the queue, on the workers that serve them, exactly as the
ensemble would run them (``same_kind`` casts, e.g. float64 data for a float32 ONNX
member). Accuracy is higher-better; ``rmse`` and ``mae`` are lower-better.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hetbatch.producers.errors import ConfigError

if TYPE_CHECKING:  # the CLI imports this module for METRICS when it builds its parser: keep that light
    import pyarrow as pa

    from hetbatch.producers.client import Client
    from hetbatch.producers.protocol.ensemble import EnsembleSpec

__all__ = ["METRICS", "evaluate"]

# name -> (score(y_true, y_pred), higher is better)
METRICS: dict[str, tuple[Callable[[np.ndarray, np.ndarray], float], bool]] = {
    "accuracy": (lambda y, p: float(np.mean(y == p)), True),
    "rmse": (lambda y, p: float(np.sqrt(np.mean((y.astype(float) - p.astype(float)) ** 2))), False),
    "mae": (lambda y, p: float(np.mean(np.abs(y.astype(float) - p.astype(float)))), False),
}


def evaluate(
    client: Client,
    name: str,
    data: str | Path | pa.Table,
    label: str,
    *,
    metric: str | None = None,
    timeout_s: float = 600.0,
) -> EnsembleSpec:
    """Score each member of select ensemble ``name`` and register the result as a new version.

    Args:
        client: a connected client (workers must serve the members).
        name: the ensemble, ``name`` or ``name@version``.
        data: a Parquet path or a table holding the members' inputs and ``label``.
        label: the column with the true values.
        metric: ``accuracy`` (default for classifiers), ``rmse`` (default otherwise) or ``mae``.
        timeout_s: how long to wait for each member's predictions.

    Returns:
        The new registry entry: ``params`` holds ``choice``, ``scores`` and ``metric``.

    Raises:
        ConfigError: not a rule-less select ensemble, no such label column, unknown metric.
        JobFailed, JobTimeout: a member's predictions failed.
    """
    import pyarrow as pa

    from hetbatch.producers.protocol.ensemble import EnsembleSpec
    from hetbatch.worker.ensemble import result_arrays

    spec = client.registry.get(name)
    if not isinstance(spec, EnsembleSpec) or spec.strategy != "select" or "rule" in spec.params:
        raise ConfigError(f"{name!r}: evaluate records the best member of a select ensemble without a rule")
    if not isinstance(data, pa.Table):
        import pyarrow.parquet as pq

        data = pq.read_table(data)
    if label not in data.column_names:
        raise ConfigError(f"label column {label!r} is not in the data; columns: {data.column_names[:10]}")
    metric = metric or ("accuracy" if spec.classes is not None else "rmse")
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; known: {sorted(METRICS)}")
    score, higher_better = METRICS[metric]
    truth = data.column(label).to_numpy()
    features = data.drop_columns([label])
    scores: dict[str, float] = {}
    for member in spec.members:
        outputs = result_arrays(client.predict(member.ref, features, cast="same_kind", timeout_s=timeout_s))
        predicted = outputs["label"] if "label" in outputs else outputs[member.output or next(iter(outputs))]
        scores[member.ref] = score(truth, predicted.reshape(len(truth)))
    pick = max if higher_better else min
    best = pick(scores, key=lambda ref: scores[ref])
    params = dict(spec.params, choice=best, scores=scores, metric=metric)
    new = replace(spec, version="", created=0.0, sha256="", params=params)
    registered: EnsembleSpec = client.registry.register(new)
    return registered
