"""PyTorch and ONNX-from-torch models through real Redis and a real worker equal their
in-process outputs; bad input and unpinned pickles get clear typed errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from hetbatch.adapters import ModelLoadError, UnsafeArtifact
from hetbatch.adapters.torch import TorchAdapter
from hetbatch.producers import Client, JobFailed, SchemaMismatch
from hetbatch.producers.errors import ConfigError
from hetbatch.producers.protocol.schema import TensorSpec, arrays_to_table, table_to_arrays
from hetbatch.producers.protocol.wire import DEVICE_KEY, decode_table, encode_table
from hetbatch.worker.modelops.registration import build_spec
from tests.kit.helpers import WorkerProcess, column, register
from tests.kit.models_dl import DLBuilt, onnx_from_torch, submit_unchecked, torch_cnn, torch_mlp

ATOL = 1e-5


@pytest.fixture(scope="module")
def mlp(work_dir: Path) -> DLBuilt:
    return torch_mlp(work_dir / "torch-mlp", "torch-mlp")


@pytest.fixture(scope="module")
def cnn(work_dir: Path) -> DLBuilt:
    return torch_cnn(work_dir / "torch-cnn", "torch-cnn")


@pytest.fixture(scope="module")
def cnn_onnx(work_dir: Path, cnn: DLBuilt) -> DLBuilt:
    return onnx_from_torch(work_dir / "torch-cnn-onnx", "torch-cnn-onnx", cnn, ["probabilities"])


@pytest.fixture(scope="module")
def mlp_onnx(work_dir: Path, mlp: DLBuilt) -> DLBuilt:
    return onnx_from_torch(work_dir / "torch-mlp-onnx", "torch-mlp-onnx", mlp, ["probabilities", "logits"])


@pytest.fixture(scope="module")
def state_dict(work_dir: Path) -> DLBuilt:
    return torch_mlp(work_dir / "torch-sd", "torch-sd", fmt="state_dict")


def assert_outputs(table: pa.Table, expected: dict[str, np.ndarray]) -> None:
    assert table.column_names == list(expected)
    for name, want in expected.items():
        got = column(table, name).reshape(want.shape)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=name)


def test_torchscript_mlp_with_two_inputs_and_two_outputs_equals_in_process(
    client: Client, cpu_worker: WorkerProcess, mlp: DLBuilt
) -> None:
    register(client, mlp.directory)
    out = client.predict("torch-mlp", mlp.inputs, chunk_rows=200, timeout_s=120)
    assert_outputs(out, mlp.expected)
    assert out.schema.metadata[DEVICE_KEY] == b"cpu"


def test_exported_cnn_takes_digits_images_as_one_tensor_column(
    client: Client, cpu_worker: WorkerProcess, cnn: DLBuilt
) -> None:
    register(client, cnn.directory)
    assert client.spec("torch-cnn").inputs == (TensorSpec("image", "float32", (1, 8, 8)),)
    images = cnn.inputs["image"]
    tensor = pa.FixedShapeTensorArray.from_numpy_ndarray(images)
    for data in (images, {"image": images}, pa.table({"image": tensor})):
        assert_outputs(client.predict("torch-cnn", data, timeout_s=120), cnn.expected)
    # A producer that writes fixed_shape_tensor columns itself reaches the worker unchanged.
    out = submit_unchecked(client, "torch-cnn", pa.table({"image": tensor})).result(timeout_s=120)
    assert_outputs(out, cnn.expected)


def test_onnx_exports_of_the_torch_models_equal_onnxruntime_and_torch(
    client: Client, cpu_worker: WorkerProcess, cnn: DLBuilt, cnn_onnx: DLBuilt, mlp: DLBuilt, mlp_onnx: DLBuilt
) -> None:
    for exported, source in ((cnn_onnx, cnn), (mlp_onnx, mlp)):
        ref = register(client, exported.directory)
        assert_outputs(client.predict(ref, exported.inputs, timeout_s=120), exported.expected)
        for name, want in source.expected.items():
            np.testing.assert_allclose(exported.expected[name], want, atol=ATOL)
    assert client.spec("torch-cnn-onnx").inputs[0].shape == (1, 8, 8)


def test_tensor_columns_decode_to_one_contiguous_view_of_the_payload(cnn: DLBuilt) -> None:
    spec = TensorSpec("image", "float32", (1, 8, 8))
    table = decode_table(encode_table(arrays_to_table(cnn.inputs)))
    arr = table_to_arrays(table, [spec])["image"]
    assert arr.shape == (len(cnn.inputs["image"]), 1, 8, 8)
    assert arr.flags.c_contiguous
    assert not arr.flags.writeable  # a view of the Arrow buffer: no per-row or whole copy
    np.testing.assert_array_equal(arr, cnn.inputs["image"])


@pytest.mark.parametrize("model", ["torch-cnn", "torch-cnn-onnx"])
def test_bad_tensors_are_refused_by_the_client_with_name_expected_and_received(
    client: Client, cpu_worker: WorkerProcess, cnn: DLBuilt, cnn_onnx: DLBuilt, model: str
) -> None:
    register(client, cnn.directory if model == "torch-cnn" else cnn_onnx.directory)
    images = cnn.inputs["image"]
    cases = {
        "wrong shape": {"image": images.reshape(-1, 8, 8)},
        "wrong dtype": {"image": images.astype(np.float64)},
        "missing input": {"picture": images},
    }
    for case, data in cases.items():
        with pytest.raises(SchemaMismatch) as info:
            client.submit(model, data)
        assert info.value.column == "image", case
        assert info.value.expected == "float32[1, 8, 8]", case
        assert info.value.received, case


@pytest.mark.parametrize("model", ["torch-mlp", "torch-cnn", "torch-cnn-onnx"])
def test_bad_arrow_sent_past_the_client_fails_the_job_and_the_worker_stays_up(
    client: Client, cpu_worker: WorkerProcess, mlp: DLBuilt, cnn: DLBuilt, cnn_onnx: DLBuilt, model: str
) -> None:
    built = {"torch-mlp": mlp, "torch-cnn": cnn, "torch-cnn-onnx": cnn_onnx}[model]
    register(client, built.directory)
    name, arr = next(iter(built.inputs.items()))
    good = {n: a[:10] for n, a in built.inputs.items()}
    flat = arr[:10].reshape(10, -1)
    cases = {
        "wrong shape": (flat[:, :-1], f"float32[{flat.shape[1] - 1}]"),
        "wrong dtype": (flat.astype(np.float64), f"float64[{flat.shape[1]}]"),
        "missing input": (None, "no such column"),
    }
    for case, (bad, received) in cases.items():
        data = dict(good)
        if bad is None:
            data[name + "_typo"] = data.pop(name)
        else:
            data[name] = bad
        job = submit_unchecked(client, model, arrays_to_table(data))
        with pytest.raises(JobFailed) as info:
            job.result(timeout_s=120)
        assert info.value.remote_type == "SchemaMismatch", case
        details = info.value.remote_details
        assert details["column"] == name, case
        assert details["expected"] == client.spec(model).inputs[0].describe(), case
        assert details["received"] == received, case
    assert cpu_worker.alive()
    assert_outputs(client.predict(model, good, timeout_s=120), {k: v[:10] for k, v in built.expected.items()})


def test_a_pinned_state_dict_with_its_module_class_equals_in_process(
    client: Client, cpu_worker: WorkerProcess, state_dict: DLBuilt
) -> None:
    spec = client.registry.register(build_spec(state_dict.directory))
    assert spec.pinned and spec.options["module"] == "tests.kit.models_dl:MLP"
    assert_outputs(client.predict("torch-sd", state_dict.inputs, timeout_s=120), state_dict.expected)


def test_a_state_dict_without_a_pin_or_with_a_wrong_one_is_refused_at_registration(
    work_dir: Path, state_dict: DLBuilt
) -> None:
    unpinned = torch_mlp(work_dir / "torch-sd-unpinned", "torch-sd-unpinned", fmt="state_dict", pin=False)
    with pytest.raises(UnsafeArtifact, match="pickle-based"):
        build_spec(unpinned.directory)
    wrong = torch_mlp(work_dir / "torch-sd-wrong", "torch-sd-wrong", fmt="state_dict", sha256="0" * 64)
    with pytest.raises(ConfigError, match="pins 0000"):
        build_spec(wrong.directory)
    # A bare torch.save file is pickle too, whatever its suffix.
    with pytest.raises(UnsafeArtifact):
        TorchAdapter(state_dict.directory / "weights.pt").load()


def test_a_worker_refuses_a_state_dict_entry_that_is_unpinned_or_changed(
    client: Client, cpu_worker: WorkerProcess, state_dict: DLBuilt
) -> None:
    good = build_spec(state_dict.directory)
    # Entries written to the registry by hand (or by an old tool), not by build_spec.
    unpinned = client.registry.register(dataclasses.replace(good, name="torch-sd-forged", version="", pinned=False))
    changed = client.registry.register(dataclasses.replace(good, name="torch-sd-changed", version="", sha256="1" * 64))
    for spec, remote_type, message in (
        (unpinned, "UnsafeArtifact", "pickle-based"),
        (changed, "ModelLoadError", "registry says 1111"),
    ):
        with pytest.raises(JobFailed, match=message) as info:
            client.predict(spec.ref, state_dict.inputs, timeout_s=120)
        assert info.value.remote_type == remote_type
    assert cpu_worker.alive()


def test_a_gpu_torch_model_never_loads_on_a_machine_without_cuda(mlp: DLBuilt) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelLoadError, match="no CUDA device"):
        TorchAdapter(mlp.directory / "model.pt", device="gpu").load()
