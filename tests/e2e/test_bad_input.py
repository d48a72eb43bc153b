"""Bad input gets a clear typed error naming the job and the problem; the worker stays up."""

from __future__ import annotations

import base64
import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from hetbatch.producers import Client, JobFailed, ModelNotFound, SchemaMismatch
from hetbatch.producers.client import Job
from hetbatch.producers.protocol.wire import TASK_NAME, Item, TaskEnvelope, encode_table, queue_for
from hetbatch.worker.modelops.config import write_config
from tests.kit.helpers import WorkerProcess, column, register
from tests.kit.models import Built, sklearn_model


@pytest.fixture(scope="module")
def iris(work_dir: Path, redis_url: str) -> Built:
    built = sklearn_model(work_dir / "bad-iris", "bad-iris", "iris")
    with Client.from_url(redis_url) as c:
        register(c, built.directory)
    return built


def send_raw(client: Client, model: str, version: str, payload: bytes, rows: int, queue: str = "sklearn.cpu") -> str:
    """Publish a task with arbitrary payload bytes straight onto a queue, as a hostile producer would."""
    job = Job(client.replies, os.urandom(8).hex(), f"{model}@{version}", 1, rows)
    client.replies.track(job.id, 1)
    env = TaskEnvelope(
        model=model,
        version=version,
        items=(Item(job.id, 0, rows),),
        payload_b64=base64.b64encode(payload).decode(),
        reply_to=client._reply_key,
    )
    client._app.send_task(TASK_NAME, args=[env.to_dict()], queue=queue)
    return job.id


def remote_error(client: Client, job_id: str, rows: int) -> JobFailed:
    from hetbatch.producers.client import Job

    with pytest.raises(JobFailed) as info:
        Job(client.replies, job_id, "x", 1, rows).result(timeout_s=30)
    assert job_id in str(info.value)
    return info.value


def test_unknown_model_is_refused_on_the_client(client: Client) -> None:
    with pytest.raises(ModelNotFound, match="no-such-model"):
        client.submit("no-such-model", np.zeros((2, 4)))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"Z": np.zeros((3, 4))}, "missing input"),
        (np.zeros((3, 5)), "expected float64\\[4\\], received float64\\[5\\]"),
        (np.zeros((3, 4), dtype=np.complex64), "cannot be cast"),
        (np.array([["a"] * 4] * 3), "string cannot be cast"),
        (np.zeros((0, 4)), "no rows"),
        (pa.table({"X": pa.array([[1.0] * 4, None], type=pa.list_(pa.float64(), 4))}), "null"),
    ],
)
def test_bad_data_is_refused_before_it_is_sent(client: Client, iris: Built, data: object, match: str) -> None:
    with pytest.raises(SchemaMismatch, match=match) as info:
        client.submit("bad-iris", data)
    assert "X" in str(info.value) or "rows" in str(info.value)


def test_lossy_cast_needs_consent(client: Client, cpu_worker: WorkerProcess, work_dir: Path) -> None:
    from tests.kit.models import onnx_from_sklearn

    built = onnx_from_sklearn(work_dir / "bad-onnx", "bad-onnx", sklearn_model(work_dir / "b", "b", "iris"))
    register(client, built.directory)
    with pytest.raises(SchemaMismatch, match="float64 cannot be cast to float32"):
        client.submit("bad-onnx", built.X.astype(np.float64))
    out = client.predict("bad-onnx", built.X.astype(np.float64), cast="same_kind", timeout_s=60)
    expected = built.model.run(None, {"X": built.X})[0]
    np.testing.assert_array_equal(column(out, "label"), expected)


def _iris_bytes(rows: int, dtype: str = "float64", width: int = 4, name: str = "X") -> bytes:
    flat = pa.array(np.random.default_rng(0).random(rows * width).astype(dtype))
    return encode_table(pa.table({name: pa.FixedSizeListArray.from_arrays(flat, width)}))


@pytest.mark.parametrize(
    ("payload", "rows", "error", "text"),
    [
        (b"garbage, not arrow", 3, "PayloadError", "not a valid Arrow IPC stream"),
        (_iris_bytes(5)[:-40], 5, "PayloadError", "not a valid Arrow IPC stream"),
        (_iris_bytes(5), 4, "PayloadError", "record batch declares 5 rows; at most 4 are expected"),
        (_iris_bytes(3), 4, "PayloadError", "payload has 3 rows, the envelope says 4"),
        (_iris_bytes(5, "float32"), 5, "SchemaMismatch", "expected float64[4], received float"),
        (_iris_bytes(5, width=3), 5, "SchemaMismatch", "received float64[3]"),
        (_iris_bytes(5, name="Y"), 5, "SchemaMismatch", "missing input column"),
        (_iris_bytes(0), 0, "SchemaMismatch", "no rows"),
    ],
)
def test_hostile_payloads_pushed_onto_the_queue_get_typed_errors(
    client: Client, cpu_worker: WorkerProcess, iris: Built, payload: bytes, rows: int, error: str, text: str
) -> None:
    version = client.spec("bad-iris").version
    job_id = send_raw(client, "bad-iris", version, payload, rows)
    err = remote_error(client, job_id, rows)
    assert err.remote_type == error
    assert text in err.remote_message
    assert cpu_worker.alive()
    good = client.predict("bad-iris", iris.X[:10], timeout_s=30)
    np.testing.assert_array_equal(column(good, "label"), iris.model.predict(iris.X[:10]))


def test_unknown_model_on_the_queue_gets_model_not_found(client: Client, cpu_worker: WorkerProcess) -> None:
    job_id = send_raw(client, "ghost", "7", _iris_bytes(2), 2)
    err = remote_error(client, job_id, 2)
    assert err.remote_type == "ModelNotFound"
    assert "ghost@7" in err.remote_message


def test_nan_is_rejected_only_where_the_model_forbids_it(
    client: Client, cpu_worker: WorkerProcess, iris: Built, work_dir: Path
) -> None:
    strict = sklearn_model(work_dir / "strict", "strict-iris", "iris", nan="reject")
    register(client, strict.directory)
    X = iris.X[:6].copy()
    X[2, 1] = np.nan
    with pytest.raises(JobFailed, match="NaN") as info:
        client.predict("strict-iris", X, timeout_s=30)
    assert info.value.remote_details["column"] == "X"
    jobs = client.submit_many("strict-iris", [iris.X[:3], X, iris.X[3:6]])
    np.testing.assert_array_equal(column(jobs[0].result(timeout_s=30), "label"), strict.model.predict(iris.X[:3]))
    with pytest.raises(JobFailed, match="NaN"):
        jobs[1].result(timeout_s=30)
    np.testing.assert_array_equal(column(jobs[2].result(timeout_s=30), "label"), strict.model.predict(iris.X[3:6]))


class _Exploit:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_message_on_the_queue_is_never_unpickled(
    client: Client, cpu_worker: WorkerProcess, iris: Built, redis_url: str, tmp_path: Path
) -> None:
    from celery import Celery

    marker = tmp_path / "unpickled"
    evil = Celery("evil", broker=redis_url, set_as_current=False)
    evil.conf.update(task_serializer="pickle", accept_content=["pickle"])
    evil.send_task(TASK_NAME, args=[_Exploit(marker)], queue=queue_for("sklearn", "cpu"), serializer="pickle")
    evil.close()
    good = client.predict("bad-iris", iris.X[:5], timeout_s=30)  # the queue moved past the evil message
    np.testing.assert_array_equal(column(good, "label"), iris.model.predict(iris.X[:5]))
    assert not marker.exists(), "a pickled message was unpickled by the worker"
    assert cpu_worker.alive()
    # Refused before Celery decodes it (and dead-lettered): not application/json.
    assert "'application/x-python-serialize', not application/json" in cpu_worker.output()
    assert pickle.dumps  # the test itself pickles; the worker never unpickles


def test_a_malformed_envelope_is_dropped_and_the_worker_stays_up(
    client: Client, cpu_worker: WorkerProcess, iris: Built
) -> None:
    client._app.send_task(TASK_NAME, args=[{"v": 1, "items": "nonsense"}], queue="sklearn.cpu")
    client._app.send_task(TASK_NAME, args=["just a string"], queue="sklearn.cpu")
    good = client.predict("bad-iris", iris.X[:5], timeout_s=30)
    np.testing.assert_array_equal(column(good, "label"), iris.model.predict(iris.X[:5]))
    assert cpu_worker.alive()


def test_a_model_that_fails_to_load_gives_a_clear_error(
    client: Client, cpu_worker: WorkerProcess, work_dir: Path, iris: Built
) -> None:
    built = sklearn_model(work_dir / "tampered", "tampered", "iris")
    register(client, built.directory)
    (built.directory / "model.skops").write_bytes(b"tampered after registration")
    with pytest.raises(JobFailed, match="sha256") as info:
        client.predict("tampered", iris.X[:3], timeout_s=30)
    assert info.value.remote_type == "ModelLoadError"


def test_pickle_artifacts_need_a_pinned_hash(client: Client, work_dir: Path, iris: Built) -> None:
    import joblib

    from hetbatch.adapters import UnsafeArtifact, sha256_of
    from hetbatch.worker.modelops.registration import build_spec

    directory = work_dir / "joblib"
    directory.mkdir()
    joblib.dump(iris.model, directory / "model.joblib")
    write_config(directory, name="pickled", framework="sklearn", artifact="model.joblib")
    with pytest.raises(UnsafeArtifact, match="pin its sha256"):
        build_spec(directory)
    write_config(directory, name="pickled", framework="sklearn", artifact="model.joblib", sha256="0" * 64)
    with pytest.raises(Exception, match="pins"):
        build_spec(directory)
    write_config(
        directory,
        name="pickled",
        framework="sklearn",
        artifact="model.joblib",
        sha256=sha256_of(directory / "model.joblib"),
    )
    assert build_spec(directory).pinned
