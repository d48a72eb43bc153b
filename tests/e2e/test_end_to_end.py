"""Jobs through real Redis and a real worker process equal the in-process predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from hetbatch.producers import Client, Status
from tests.kit.helpers import WorkerProcess, column, register
from tests.kit.models import Built, onnx_from_sklearn, sklearn_model


@pytest.fixture(scope="module")
def iris(work_dir: Path) -> Built:
    return sklearn_model(work_dir / "iris", "iris-forest", "iris")


@pytest.fixture(scope="module")
def cancer(work_dir: Path) -> Built:
    return sklearn_model(work_dir / "cancer", "cancer-logreg", "breast_cancer", kind="logreg")


@pytest.fixture(scope="module")
def digits_onnx(work_dir: Path) -> Built:
    built = sklearn_model(work_dir / "digits", "digits-forest", "digits")
    return onnx_from_sklearn(work_dir / "digits-onnx", "digits-onnx", built)


def test_sklearn_forest_predictions_equal_in_process(client: Client, cpu_worker: WorkerProcess, iris: Built) -> None:
    register(client, iris.directory)
    out = client.predict("iris-forest", iris.X, timeout_s=60)
    assert out.column_names == ["label", "probabilities"]
    np.testing.assert_array_equal(column(out, "label"), iris.model.predict(iris.X))
    np.testing.assert_allclose(column(out, "probabilities"), iris.model.predict_proba(iris.X), atol=1e-6)


def test_sklearn_pipeline_on_many_chunks_keeps_row_order(
    client: Client, cpu_worker: WorkerProcess, cancer: Built
) -> None:
    register(client, cancer.directory)
    X = np.tile(cancer.X, (20, 1))
    job = client.submit("cancer-logreg", X, chunk_rows=1000)
    assert job.chunks == int(np.ceil(len(X) / 1000))
    out = job.result(timeout_s=120)
    np.testing.assert_array_equal(column(out, "label"), cancer.model.predict(X))
    np.testing.assert_allclose(column(out, "probabilities"), cancer.model.predict_proba(X), atol=1e-6)
    assert job.status() is Status.DONE


def test_onnx_conversion_predictions_equal_onnxruntime_in_process(
    client: Client, cpu_worker: WorkerProcess, digits_onnx: Built
) -> None:
    register(client, digits_onnx.directory)
    out = client.predict("digits-onnx", digits_onnx.X, timeout_s=60)
    label, proba = digits_onnx.model.run(None, {digits_onnx.model.get_inputs()[0].name: digits_onnx.X})
    np.testing.assert_array_equal(column(out, "label"), label)
    np.testing.assert_allclose(column(out, "probabilities"), proba, atol=1e-6)


def test_every_input_kind_gives_the_same_answer(client: Client, cpu_worker: WorkerProcess, iris: Built) -> None:
    import pandas as pd

    register(client, iris.directory)
    expected = iris.model.predict(iris.X)
    frame = pd.DataFrame(iris.X, columns=[f"f{i}" for i in range(4)])
    table = pa.table({"X": pa.FixedSizeListArray.from_arrays(pa.array(iris.X.ravel()), 4)})
    for data in (iris.X, {"X": iris.X}, table, table.to_batches()[0]):
        np.testing.assert_array_equal(column(client.predict("iris-forest", data, timeout_s=60), "label"), expected)
    with pytest.raises(Exception, match="missing input"):
        client.predict("iris-forest", frame)


def test_feature_columns_are_packed_from_a_dataframe(client: Client, cpu_worker: WorkerProcess, work_dir: Path) -> None:
    import pandas as pd
    import skops.io as sio
    from sklearn.datasets import load_wine
    from sklearn.ensemble import RandomForestClassifier

    from hetbatch.worker.modelops.config import write_config

    frame, y = load_wine(return_X_y=True, as_frame=True)
    model = RandomForestClassifier(n_estimators=10, random_state=0).fit(frame, y)
    directory = work_dir / "wine"
    directory.mkdir()
    sio.dump(model, directory / "model.skops")
    write_config(directory, name="wine", framework="sklearn", artifact="model.skops")
    register(client, directory)
    assert client.spec("wine").inputs[0].columns == tuple(frame.columns)
    shuffled = frame[list(reversed(frame.columns))].assign(key=range(len(frame)))
    out = client.predict("wine", shuffled, timeout_s=60)
    np.testing.assert_array_equal(column(out, "label"), model.predict(frame))
    assert isinstance(shuffled, pd.DataFrame)


def test_submit_many_small_jobs_each_get_their_own_result(
    client: Client, cpu_worker: WorkerProcess, iris: Built
) -> None:
    register(client, iris.directory)
    pieces = [iris.X[i : i + 1 + i % 7] for i in range(0, 140, 5)]
    jobs = client.submit_many("iris-forest", pieces)
    assert len({j.id for j in jobs}) == len(pieces)
    for job, piece in zip(jobs, pieces):
        np.testing.assert_array_equal(column(job.result(timeout_s=60), "label"), iris.model.predict(piece))


def test_a_new_version_is_picked_up_without_restarting_the_worker(
    client: Client, cpu_worker: WorkerProcess, work_dir: Path
) -> None:
    first = sklearn_model(work_dir / "ver1", "versioned", "iris", kind="forest")
    ref1 = register(client, first.directory)
    second = sklearn_model(work_dir / "ver2", "versioned", "iris", kind="logreg")
    ref2 = register(client, second.directory)
    assert ref1 != ref2
    np.testing.assert_allclose(
        column(client.predict(ref1, first.X, timeout_s=60), "probabilities"),
        first.model.predict_proba(first.X),
        atol=1e-6,
    )
    client._specs.clear()
    np.testing.assert_allclose(
        column(client.predict("versioned", second.X, timeout_s=60), "probabilities"),
        second.model.predict_proba(second.X),
        atol=1e-6,
    )
