"""A worker picks instances and call size for an ONNX model by measuring, never at the
cost of its bits: the configuration it keeps gives exactly the in-process outputs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from hetbatch.producers.protocol.keys import Keys
from hetbatch.producers.protocol.registry import Registry
from hetbatch.worker.batching import join
from hetbatch.worker.modelops.registration import build_spec
from hetbatch.worker.models import ModelCache
from hetbatch.worker.settings import WorkerSettings
from tests.kit.models import onnx_from_sklearn, onnx_mlp, sklearn_model

multicore = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: nothing to calibrate")


def _load(tmp_path: Path, directory: Path, **settings: object) -> object:
    cache = ModelCache(Registry(None, Keys("calib")), WorkerSettings(**settings))  # type: ignore[arg-type]
    return cache, cache._load(build_spec(directory))


@multicore
def test_an_mlp_runs_one_single_threaded_instance_per_core(tmp_path: Path) -> None:
    built = onnx_mlp(tmp_path / "mlp", "mlp")
    cache, loaded = _load(tmp_path, built.directory)
    assert loaded.batcher.max_batch_rows in (512, 1024, 2048, 4096, 8192)  # type: ignore[attr-defined]
    assert len(loaded.batcher._threads) == min(8, len(os.sched_getaffinity(0)))  # type: ignore[attr-defined]
    X = np.random.default_rng(3).standard_normal((5000, 32)).astype(np.float32)
    got = join(loaded.batcher.submit({"x": X}, len(X)).result(timeout=30))  # type: ignore[attr-defined]
    (want,) = built.model.run(None, {"x": X})
    np.testing.assert_array_equal(got["probabilities"], want)
    cache.close()  # type: ignore[attr-defined]


@multicore
def test_whatever_it_picks_a_forest_gives_the_in_process_bits(tmp_path: Path) -> None:
    """A tree ensemble sums trees in another order on one thread: calibration sees the
    difference and keeps one call over every core."""
    built = onnx_from_sklearn(tmp_path / "forest-onnx", "forest-onnx", sklearn_model(tmp_path / "f", "f", trees=60))
    cache, loaded = _load(tmp_path, built.directory)
    X = np.random.default_rng(4).standard_normal((3000, built.X.shape[1])).astype(np.float32) * 3
    want = built.model.run(None, {"X": X})
    got = join(loaded.batcher.submit({"X": X}, len(X)).result(timeout=30))  # type: ignore[attr-defined]
    for name, value in zip(["label", "probabilities"], want):
        np.testing.assert_array_equal(got[name], value)
    cache.close()  # type: ignore[attr-defined]


def test_explicit_settings_are_not_calibrated(tmp_path: Path) -> None:
    built = onnx_mlp(tmp_path / "mlp", "mlp")
    cache, loaded = _load(tmp_path, built.directory, instances=1, max_batch_rows=300)
    assert loaded.batcher.max_batch_rows == 300 and len(loaded.batcher._threads) == 1  # type: ignore[attr-defined]
    cache.close()  # type: ignore[attr-defined]


def test_a_probe_the_model_rejects_keeps_one_every_core_call(tmp_path: Path) -> None:
    """Random probe indices beyond an embedding table make the probe fail: the model then
    loads as it would without calibration, and valid jobs still score."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    table = np.arange(12, dtype=np.float32).reshape(4, 3)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["vectors"], axis=0)],
        "embed",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, [None, 1])],
        [helper.make_tensor_value_info("vectors", TensorProto.FLOAT, [None, 1, 3])],
        [numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    directory = tmp_path / "embed"
    directory.mkdir()
    onnx.save(model, directory / "model.onnx")
    from hetbatch.worker.modelops.config import write_config

    write_config(directory, name="embed", framework="onnx", artifact="model.onnx")
    cache, loaded = _load(tmp_path, directory)
    assert len(loaded.batcher._threads) == 1  # type: ignore[attr-defined]
    idx = np.array([[0], [3], [2]], dtype=np.int64)
    got = join(loaded.batcher.submit({"idx": idx}, 3).result(timeout=30))  # type: ignore[attr-defined]
    session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(got["vectors"], session.run(None, {"idx": idx})[0])
    cache.close()  # type: ignore[attr-defined]
