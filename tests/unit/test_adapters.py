"""Adapters behave alike whatever the framework: one error type per kind of failure,
typed options that refuse a typo, declared capabilities, and a warm-up call at load."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from hetbatch.adapters import Adapter, InvalidOptions, ModelLoadError, OutOfMemory, PredictError, adapter_class
from hetbatch.adapters.base import DeviceFailed, TensorInfo, sha256_of
from hetbatch.adapters.torch import place_program
from hetbatch.producers.errors import RemoteError
from hetbatch.producers.protocol.keys import Keys
from hetbatch.producers.protocol.registry import Registry
from hetbatch.worker.batching import join
from hetbatch.worker.modelops.registration import build_spec, write_config
from hetbatch.worker.models import ModelCache
from hetbatch.worker.settings import WorkerSettings
from tests.kit.models import onnx_mlp

FRAMEWORKS = ("sklearn", "onnx", "torch", "tensorflow")


class Baked(torch.nn.Module):
    """A model whose graph creates a tensor on a fixed device (here ``meta``, standing in
    for the ``cpu`` a traced graph keeps on a GPU): it fails on its first call anywhere else."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(x) + torch.ones(3, device="meta")
        return out


class HalfOut(torch.nn.Module):
    """A model that answers in bfloat16, which numpy cannot hold."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(x).to(torch.bfloat16)
        return out


def _state_dict_model(directory: Path, module: type[torch.nn.Module]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(module().state_dict(), directory / "weights.pt")
    write_config(
        directory, name=directory.name, framework="torch", artifact="weights.pt",
        sha256=sha256_of(directory / "weights.pt"),
        options={"module": f"{__name__}:{module.__name__}", "input_names": ["x"]},
        inputs=[{"name": "x", "dtype": "float32", "shape": [4]}],
    )  # fmt: skip
    return directory


@pytest.fixture(scope="module")
def four(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, Any], str]]:
    """One small model per framework, each taking 4 float features: (artifact, options, input)."""
    import keras
    import skops.io as sio
    from sklearn.linear_model import LogisticRegression

    root = tmp_path_factory.mktemp("adapters")
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((60, 4)), rng.integers(0, 3, 60)
    sio.dump(LogisticRegression().fit(X, y), root / "model.skops")
    onnx = onnx_mlp(root / "onnx", "onnx", features=4, hidden=8, classes=3).directory / "model.onnx"
    torch.jit.save(torch.jit.script(torch.nn.Linear(4, 3)), str(root / "model.pt"))
    keras.Sequential([keras.Input((4,), name="x"), keras.layers.Dense(3)]).save(root / "model.keras")
    return {
        "sklearn": (root / "model.skops", {}, "X"),
        "onnx": (onnx, {}, "x"),
        "torch": (root / "model.pt", {"input_names": ["x"]}, "x"),
        "tensorflow": (root / "model.keras", {}, "x"),
    }


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_the_same_bad_call_is_the_same_remote_type_whatever_the_framework(
    framework: str, four: dict[str, tuple[Path, dict[str, Any], str]]
) -> None:
    artifact, options, name = four[framework]
    adapter = adapter_class(framework)(artifact, options=options).load()
    good = adapter.predict({name: np.zeros((2, 4), np.float32 if framework != "sklearn" else np.float64)})
    assert all(len(v) == 2 for v in good.values())
    for bad in ({name: np.zeros((2, 5), np.float32)}, {"nope": np.zeros((2, 4), np.float32)}):
        with pytest.raises(PredictError) as caught:
            adapter.predict(bad)
        assert type(caught.value) is PredictError and "\n" not in str(caught.value)
        assert RemoteError.from_exception(caught.value).type == "PredictError"


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_an_unknown_option_is_an_error_naming_the_key(
    framework: str, four: dict[str, tuple[Path, dict[str, Any], str]]
) -> None:
    artifact, options, _ = four[framework]
    with pytest.raises(InvalidOptions, match=r"unknown key\(s\) \['theads'\].*known: \[.*'threads'"):
        adapter_class(framework)(artifact, options={**options, "theads": 2})
    with pytest.raises(InvalidOptions, match=r"threads = 'two' is not a int"):
        adapter_class(framework)(artifact, options={**options, "threads": "two"})


def test_a_typo_in_model_toml_fails_registration_and_the_old_kwargs_name_says_its_new_one(tmp_path: Path) -> None:
    directory = _state_dict_model(tmp_path / "renamed", HalfOut)
    with open(directory / "model.toml", "a") as fh:
        fh.write("[options.kwargs]\nfeatures = 4\n")
    with pytest.raises(InvalidOptions, match=r"\['kwargs'\] \('kwargs' is now 'module_kwargs'\)"):
        build_spec(directory)
    onnx = onnx_mlp(tmp_path / "typo", "typo", features=4, hidden=8, classes=3).directory
    with open(onnx / "model.toml", "a") as fh:
        fh.write("[options]\ngraph_optimisation = 'basic'\n")
    with pytest.raises(ModelLoadError, match="graph_optimisation"):
        build_spec(onnx)


def test_capabilities_are_declared_by_the_adapters(four: dict[str, tuple[Path, dict[str, Any], str]]) -> None:
    caps = {f: adapter_class(f).capabilities(four[f][0]) for f in FRAMEWORKS}
    assert caps["sklearn"].instance_per_core and not caps["sklearn"].calibrated_threads
    assert caps["onnx"].calibrated_threads and not caps["onnx"].couples_rows
    assert not any(caps[f].calibrated_threads or caps[f].instance_per_core for f in ("torch", "tensorflow"))


def test_a_model_that_fails_its_first_call_is_one_load_error_in_the_worker(tmp_path: Path) -> None:
    spec = build_spec(_state_dict_model(tmp_path / "baked", Baked))  # loading alone does not call it
    cache = ModelCache(Registry(None, Keys("warm")), WorkerSettings())  # type: ignore[arg-type]
    with pytest.raises(ModelLoadError, match=r"torch model weights.pt on cpu failed its first call .*meta"):
        cache.get(spec)
    assert cache.loaded() == []


def test_bfloat16_outputs_come_back_as_float32_equal_to_in_process(tmp_path: Path) -> None:
    spec = build_spec(_state_dict_model(tmp_path / "bf16", HalfOut))
    loaded = ModelCache(Registry(None, Keys("bf16")), WorkerSettings()).get(spec)  # type: ignore[arg-type]
    X = np.random.default_rng(1).standard_normal((50, 4)).astype(np.float32)
    got = join(loaded.batcher.submit({"x": X}, len(X)).result(timeout=30))["output"]
    net = HalfOut()
    net.load_state_dict(torch.load(tmp_path / "bf16" / "weights.pt", weights_only=True))
    with torch.no_grad():
        want = net(torch.from_numpy(X)).float().numpy()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


def test_an_exported_program_is_placed_with_its_graph_devices_rewritten() -> None:
    class Constant(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.ones(3)  # traced on the CPU: the graph says device=cpu

    batch = torch.export.Dim("batch")
    program = torch.export.export(Constant(), (torch.zeros(4, 3),), dynamic_shapes={"x": {0: batch}})
    x = torch.zeros(2, 3, device="meta")  # "meta" stands in for a GPU on a machine without one
    with pytest.raises(RuntimeError, match="device"):
        program.module().to("meta")(x)
    assert place_program(program, torch.device("meta"))(x).device.type == "meta"


class _Raising(Adapter):
    """An adapter whose model raises what it is told to: the base class types it."""

    framework = "test"

    def __init__(self, exc: BaseException) -> None:
        super().__init__(Path("."))
        self.exc, self.released = exc, 0

    def _load(self) -> None:
        return None

    def _predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise self.exc

    def describe(self) -> tuple[list[TensorInfo], list[TensorInfo]]:
        return [], []

    def release_memory(self) -> None:
        self.released += 1


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("CUDA out of memory. Tried to allocate 2.00 GiB", OutOfMemory),
        ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", OutOfMemory),
        ("cuDNN error: CUDNN_STATUS_ALLOC_FAILED", OutOfMemory),
        ("Dst tensor is not initialized. [Op:IdentityN]", OutOfMemory),
        ("DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes", OutOfMemory),
        ("BFCArena::AllocateRawInternal Failed to allocate memory for requested buffer of size 4096", OutOfMemory),
        ("Available memory of 0 is smaller than requested bytes of 268435456", OutOfMemory),
        ("OOM when allocating tensor with shape[8192,4096]", OutOfMemory),
        ("CUDA error: device-side assert triggered", DeviceFailed),
        ("CUDA error: an illegal memory access was encountered", DeviceFailed),
        ("mat1 and mat2 shapes cannot be multiplied (2x5 and 4x3)", PredictError),
    ],
)
def test_every_frameworks_allocator_and_sticky_messages_are_recognized(message: str, kind: type) -> None:
    adapter = _Raising(RuntimeError(message))
    with pytest.raises(kind) as caught:
        adapter.predict({"x": np.zeros((1, 1))})
    assert type(caught.value) is kind
    assert adapter.released == (1 if kind is OutOfMemory else 0)
    # The OOM is not chained: the framework's traceback (and the batch's tensors) are gone.
    assert kind is not OutOfMemory or caught.value.__cause__ is None
