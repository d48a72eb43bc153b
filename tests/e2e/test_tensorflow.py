"""TensorFlow/Keras models with two named inputs and two named outputs, through real Redis
and a real worker, equal their in-process outputs; torch runs in the same worker process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hetbatch.adapters import UnsafeArtifact
from hetbatch.producers import Client, JobFailed, SchemaMismatch
from hetbatch.producers.protocol.schema import TensorSpec, arrays_to_table
from hetbatch.producers.protocol.wire import DEVICE_KEY
from hetbatch.worker.modelops.registration import build_spec, write_config
from tests.kit.helpers import WorkerProcess, column, register
from tests.kit.models_dl import DLBuilt, keras_two_inputs, submit_unchecked, torch_mlp

ATOL = 1e-5


@pytest.fixture(scope="module")
def keras_file(work_dir: Path) -> DLBuilt:
    return keras_two_inputs(work_dir / "tf-keras", "tf-keras", fmt="keras")


@pytest.fixture(scope="module")
def saved_model(work_dir: Path) -> DLBuilt:
    return keras_two_inputs(work_dir / "tf-saved", "tf-saved", fmt="savedmodel")


def assert_outputs(table: object, expected: dict[str, np.ndarray]) -> None:
    for name, want in expected.items():
        got = column(table, name).reshape(want.shape)
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=name)


def test_registration_reads_input_names_dtypes_and_shapes_from_the_model(
    keras_file: DLBuilt, saved_model: DLBuilt
) -> None:
    expected = {TensorSpec("image", "float32", (8, 8)), TensorSpec("extra", "float32", (3,))}
    for built in (keras_file, saved_model):
        spec = build_spec(built.directory)
        assert set(spec.inputs) == expected
        assert set(spec.outputs) == {"probabilities", "energy"}


@pytest.mark.parametrize("fmt", ["keras", "saved_model"])
def test_two_named_inputs_and_outputs_equal_in_process(
    client: Client, cpu_worker: WorkerProcess, keras_file: DLBuilt, saved_model: DLBuilt, fmt: str
) -> None:
    built = keras_file if fmt == "keras" else saved_model
    ref = register(client, built.directory)
    job = client.submit(ref, built.inputs, chunk_rows=500)
    out = job.result(timeout_s=180)
    assert set(out.column_names) == {"probabilities", "energy"}
    assert out.schema.metadata[DEVICE_KEY] == b"cpu"
    assert_outputs(out, built.expected)
    # Small jobs coalesced by the batcher come back to their own owners.
    ranges = [slice(i, i + 1 + i % 5) for i in range(0, 60, 6)]
    jobs = client.submit_many(ref, [{n: a[r] for n, a in built.inputs.items()} for r in ranges])
    for job, rows in zip(jobs, ranges, strict=True):
        assert_outputs(job.result(timeout_s=180), {k: v[rows] for k, v in built.expected.items()})


def test_torch_and_tensorflow_models_share_one_worker_process(
    client: Client, cpu_worker: WorkerProcess, keras_file: DLBuilt, work_dir: Path
) -> None:
    mlp = torch_mlp(work_dir / "tf-side-mlp", "tf-side-mlp")
    register(client, keras_file.directory)
    register(client, mlp.directory)
    keras_job = client.submit("tf-keras", keras_file.inputs)
    torch_job = client.submit("tf-side-mlp", mlp.inputs)
    assert_outputs(torch_job.result(timeout_s=180), mlp.expected)
    assert_outputs(keras_job.result(timeout_s=180), keras_file.expected)
    assert cpu_worker.alive()


def test_bad_inputs_get_schema_mismatch_from_client_and_worker(
    client: Client, cpu_worker: WorkerProcess, keras_file: DLBuilt
) -> None:
    ref = register(client, keras_file.directory)
    image, extra = keras_file.inputs["image"][:20], keras_file.inputs["extra"][:20]
    client_cases = {
        "wrong shape": ({"image": image.reshape(20, 64), "extra": extra}, "image"),
        "wrong dtype": ({"image": image.astype(np.float64), "extra": extra}, "image"),
        "missing input": ({"image": image}, "extra"),
    }
    for case, (data, name) in client_cases.items():
        with pytest.raises(SchemaMismatch) as info:
            client.submit(ref, data)
        assert info.value.column == name, case
        assert info.value.expected and info.value.received, case
    worker_cases = {
        "wrong shape": ({"image": image, "extra": extra[:, :2]}, "extra", "float32[3]", "float32[2]"),
        "wrong dtype": ({"image": image, "extra": extra.astype(np.int64)}, "extra", "float32[3]", "int64[3]"),
        "missing input": ({"image": image}, "extra", "float32[3]", "no such column"),
    }
    for case, (data, name, expected, received) in worker_cases.items():
        job = submit_unchecked(client, ref, arrays_to_table(data))
        with pytest.raises(JobFailed) as failed:
            job.result(timeout_s=180)
        assert failed.value.remote_type == "SchemaMismatch", case
        assert failed.value.remote_details == {"column": name, "expected": expected, "received": received}, case
    assert cpu_worker.alive()


def test_a_keras_file_with_python_code_is_refused(work_dir: Path) -> None:
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(lambda t: t * 2)])
    directory = work_dir / "tf-lambda"
    directory.mkdir()
    model.save(directory / "model.keras")
    write_config(directory, name="tf-lambda", framework="tensorflow", artifact="model.keras")
    with pytest.raises(UnsafeArtifact, match="Lambda"):
        build_spec(directory)
