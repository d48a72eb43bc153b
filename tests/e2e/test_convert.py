"""Adaptation: models converted to ONNX, optimized and quantized, then scored through the queue.

Every converted model is registered and scored by a real worker; its results are held
to the SOURCE model's own in-process output, within the tolerance its report states.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hetbatch.adapters import UnsafeArtifact, sha256_of
from hetbatch.adapters.offline.parity import ParityError
from hetbatch.producers import Client
from hetbatch.producers.protocol.registry import ModelSpec
from hetbatch.producers.protocol.schema import TensorSpec, to_table
from hetbatch.worker.cli import main
from hetbatch.worker.modelops.adapt import convert_model, optimize_model, quantize_model
from hetbatch.worker.modelops.config import write_config
from tests.kit.helpers import WorkerProcess, column, register
from tests.kit.models import Built, sklearn_model

pytestmark = pytest.mark.timeout(600)


def rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """The parity report's relative error (see adapters.offline.parity)."""
    expected = np.asarray(expected, dtype=np.float64)
    floor = max(1e-3 * float(np.abs(expected).max()), np.finfo(np.float64).tiny)
    return float((np.abs(np.asarray(actual, np.float64) - expected) / np.maximum(np.abs(expected), floor)).max())


def write_sample(path: Path, spec: ModelSpec, X: np.ndarray, y: np.ndarray | None = None) -> Path:
    table = to_table(X, spec.inputs)
    if y is not None:
        table = table.append_column("y", pa.array(y))
    pq.write_table(table, path)
    return path


def register_spec(client: Client, **fields: Any) -> str:
    """Register a torch/keras source by its spec (its framework adapter is not needed)."""
    artifact = Path(fields["artifact"])
    spec = ModelSpec(sha256=sha256_of(artifact), **{**fields, "artifact": str(artifact)})
    return str(client.registry.register(spec).ref)


def tiny_net(features: int = 8, classes: int = 3) -> Any:
    """The eager torch MLP of these tests; the state-dict source imports it by name."""
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(features, 16), torch.nn.ReLU(), torch.nn.Linear(16, classes))


@pytest.fixture(scope="module")
def cancer_pipeline(work_dir: Path) -> Built:
    return sklearn_model(work_dir / "cv-cancer", "cv-cancer", "breast_cancer", kind="logreg")


@pytest.fixture(scope="module")
def iris_forest(work_dir: Path) -> Built:
    return sklearn_model(work_dir / "cv-iris", "cv-iris", "iris", kind="forest")


def test_sklearn_pipeline_converts_passes_parity_and_scores_like_the_source(
    client: Client, cpu_worker: WorkerProcess, cancer_pipeline: Built, work_dir: Path
) -> None:
    source = register(client, cancer_pipeline.directory)
    spec = client.registry.get(source)
    sample = write_sample(work_dir / "cv-cancer.parquet", spec, cancer_pipeline.X)
    adapted = convert_model(client.registry, source, sample=sample)
    new = adapted.spec
    assert (new.name, new.framework) == ("cv-cancer", "onnx") and new.version != spec.version
    assert (new.inputs, new.outputs, new.classes) == (spec.inputs, spec.outputs, spec.classes)
    assert adapted.parity.ok and adapted.parity.rows == len(cancer_pipeline.X)
    out = client.predict(new.ref, cancer_pipeline.X, timeout_s=120)
    np.testing.assert_array_equal(column(out, "label"), cancer_pipeline.model.predict(cancer_pipeline.X))
    proba = cancer_pipeline.model.predict_proba(cancer_pipeline.X)
    rtol = adapted.parity.outputs[1].rtol
    assert rtol is not None and rel_error(column(out, "probabilities"), proba) <= rtol


def test_random_forest_converts_and_scores_like_the_source(
    client: Client, cpu_worker: WorkerProcess, iris_forest: Built, work_dir: Path
) -> None:
    source = register(client, iris_forest.directory)
    spec = client.registry.get(source)
    adapted = convert_model(
        client.registry, source, sample=write_sample(work_dir / "cv-iris.parquet", spec, iris_forest.X)
    )
    by_name = {o.name: o for o in adapted.parity.outputs}
    assert by_name["label"].agreement == 1.0
    out = client.predict(adapted.spec.ref, iris_forest.X, timeout_s=120)
    np.testing.assert_array_equal(column(out, "label"), iris_forest.model.predict(iris_forest.X))
    proba = iris_forest.model.predict_proba(iris_forest.X)
    assert rel_error(column(out, "probabilities"), proba) <= (by_name["probabilities"].rtol or 0)


def test_torchscript_mlp_converts_with_a_dynamic_batch_and_scores_like_the_source(
    client: Client, cpu_worker: WorkerProcess, work_dir: Path
) -> None:
    import torch

    net = torch.jit.script(tiny_net())
    directory = work_dir / "cv-torch"
    directory.mkdir()
    net.save(str(directory / "model.pt"))
    source = register_spec(
        client, name="cv-torch", framework="torch", artifact=directory / "model.pt",
        inputs=(TensorSpec("x", "float32", (8,)),), outputs=("logits",),
    )  # fmt: skip
    adapted = convert_model(client.registry, source)  # sample generated from the schema
    assert adapted.spec.inputs == client.registry.get(source).inputs and adapted.spec.outputs == ("logits",)
    X = np.random.default_rng(1).standard_normal((777, 8)).astype(np.float32)
    out = client.predict(adapted.spec.ref, X, timeout_s=120)
    with torch.no_grad():
        expected = net(torch.from_numpy(X)).numpy()
    assert rel_error(column(out, "logits"), expected) <= (adapted.parity.outputs[0].rtol or 0)


def test_a_state_dict_source_converts_only_with_a_pinned_hash(
    client: Client, cpu_worker: WorkerProcess, work_dir: Path
) -> None:
    import torch

    net = tiny_net().eval()
    directory = work_dir / "cv-eager"
    directory.mkdir()
    torch.save(net.state_dict(), directory / "weights.pt")
    fields: dict[str, Any] = dict(
        framework="torch", artifact=directory / "weights.pt", inputs=(TensorSpec("x", "float32", (8,)),),
        outputs=("logits",), options={"module": "tests.e2e.test_convert:tiny_net"},
    )  # fmt: skip
    unpinned = register_spec(client, name="cv-eager-unpinned", **fields)
    with pytest.raises(UnsafeArtifact, match="pin its sha256"):
        convert_model(client.registry, unpinned)
    assert client.registry.versions("cv-eager-unpinned") == ["1"]
    pinned = register_spec(client, name="cv-eager", pinned=True, **fields)
    adapted = convert_model(client.registry, pinned)
    X = np.random.default_rng(2).standard_normal((300, 8)).astype(np.float32)
    out = client.predict(adapted.spec.ref, X, timeout_s=120)
    with torch.no_grad():
        expected = net(torch.from_numpy(X)).numpy()
    assert rel_error(column(out, "logits"), expected) <= (adapted.parity.outputs[0].rtol or 0)


def test_convert_and_the_worker_load_one_state_dict_model_toml_alike(
    client: Client, cpu_worker: WorkerProcess, work_dir: Path
) -> None:
    """One model.toml, one meaning: ``hetbatch convert`` and the worker both build the
    module with ``options.module_kwargs`` and load the same weights."""
    import torch

    net = tiny_net(features=8, classes=4).eval()  # not the factory's default: the kwargs matter
    directory = work_dir / "cv-toml"
    directory.mkdir()
    torch.save(net.state_dict(), directory / "weights.pt")
    write_config(
        directory, name="cv-toml", framework="torch", artifact="weights.pt", sha256=sha256_of(directory / "weights.pt"),
        options={"module": "tests.e2e.test_convert:tiny_net", "input_names": ["x"], "output_names": ["logits"]},
        inputs=[{"name": "x", "dtype": "float32", "shape": [8]}],
    )  # fmt: skip
    with open(directory / "model.toml", "a") as fh:  # write_config has no inline tables
        fh.write("[options.module_kwargs]\nfeatures = 8\nclasses = 4\n")
    source = register(client, directory)
    X = np.random.default_rng(5).standard_normal((400, 8)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(X)).numpy()
    served = column(client.predict(source, X, timeout_s=120), "logits")
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)
    assert main(["--redis-url", client.settings.redis_url, "convert", source]) == 0
    converted = client.registry.get("cv-toml")
    assert converted.framework == "onnx" and converted.options["source"] == source
    out = column(client.predict(converted.ref, X, timeout_s=120), "logits")
    assert out.shape == (400, 4) and rel_error(out, expected) <= 1e-4


def test_keras_model_converts_and_scores_like_the_source(
    client: Client, cpu_worker: WorkerProcess, work_dir: Path
) -> None:
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((8,), name="x"), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3, "softmax")]
    )
    directory = work_dir / "cv-keras"
    directory.mkdir()
    model.save(directory / "model.keras")
    source = register_spec(
        client, name="cv-keras", framework="tensorflow", artifact=directory / "model.keras",
        inputs=(TensorSpec("x", "float32", (8,)),), outputs=("probabilities",),
    )  # fmt: skip
    adapted = convert_model(client.registry, source)
    X = np.random.default_rng(3).standard_normal((500, 8)).astype(np.float32)
    out = client.predict(adapted.spec.ref, X, timeout_s=120)
    expected = model.predict(X, verbose=0)
    assert rel_error(column(out, "probabilities"), expected) <= (adapted.parity.outputs[0].rtol or 0)


def test_an_unsupported_estimator_fails_clearly_and_registers_nothing(client: Client, work_dir: Path) -> None:
    import skops.io as sio
    from sklearn.datasets import load_iris
    from sklearn.neighbors import NearestCentroid

    X, y = load_iris(return_X_y=True)
    directory = work_dir / "cv-centroid"
    directory.mkdir()
    sio.dump(NearestCentroid().fit(X, y), directory / "model.skops")
    write_config(directory, name="cv-centroid", framework="sklearn", artifact="model.skops")
    source = register(client, directory)
    with pytest.raises(Exception, match="skl2onnx cannot convert NearestCentroid"):
        convert_model(client.registry, source)
    assert client.registry.versions("cv-centroid") == ["1"]
    assert sorted(p.name for p in directory.iterdir()) == ["model.skops", "model.toml"]


def test_a_tolerance_tighter_than_achieved_refuses_and_registers_nothing(
    client: Client, iris_forest: Built, work_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = register(client, iris_forest.directory)
    spec = client.registry.get(source)
    before = client.registry.versions("cv-iris")
    with pytest.raises(ParityError, match="does not reproduce the source") as caught:
        convert_model(client.registry, source, rtol=1e-12)
    assert not caught.value.report.ok and "FAIL" in str(caught.value)
    assert client.registry.versions("cv-iris") == before
    assert not list(Path(spec.artifact).parent.glob(f"cv-iris-v{spec.version}-onnx*"))
    code = main(["--redis-url", client.settings.redis_url, "convert", source, "--rtol", "1e-12"])
    assert code == 2 and "ParityError" in capsys.readouterr().err
    assert client.registry.versions("cv-iris") == before


@pytest.fixture(scope="module")
def digits_mlp(work_dir: Path) -> Built:
    """An MLP trained on digits, as ONNX (float32 input): accuracy means something."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    X, y = load_digits(return_X_y=True)
    X = (X / 16).astype(np.float32)
    model = MLPClassifier((128, 64), max_iter=60, random_state=0).fit(X[:1200], y[:1200])
    directory = work_dir / "cv-digits-mlp"
    directory.mkdir()
    onx = to_onnx(model, X[:1], options={"zipmap": False}, target_opset=17)
    (directory / "model.onnx").write_bytes(onx.SerializeToString())
    write_config(directory, name="cv-digits-mlp", framework="onnx", artifact="model.onnx")
    return Built(directory, model, X[1200:], y[1200:])


def test_int8_quantization_reports_size_shrink_and_accuracy_delta_as_a_table(
    client: Client, cpu_worker: WorkerProcess, digits_mlp: Built, work_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import onnxruntime as ort

    source = register(client, digits_mlp.directory)
    sample = write_sample(work_dir / "cv-digits.parquet", client.registry.get(source), digits_mlp.X, digits_mlp.y)
    args = ["--redis-url", client.settings.redis_url, "quantize", source, "--mode", "int8"]
    assert main([*args, "--sample", str(sample), "--labels", "y", "--batch-sizes", "1,64"]) == 0
    printed = capsys.readouterr().out
    assert "accuracy on labels" in printed and "rows/s before" in printed and "verdict: PASS" in printed
    quantized = client.registry.get("cv-digits-mlp")
    assert quantized.ref != source and quantized.options["source"] == source
    adapted = quantize_model(client.registry, source, sample=sample, labels="y", batch_sizes=(64,))
    report = adapted.report
    assert report.size_after_bytes < 0.5 * report.size_before_bytes
    assert report.parity.accuracy is not None and report.parity.accuracy_delta is not None
    assert abs(report.parity.accuracy_delta) <= 0.01 and report.parity.accuracy[0] > 0.8
    session = ort.InferenceSession(str(adapted.spec.artifact), providers=["CPUExecutionProvider"])
    label, proba = session.run(None, {"X": digits_mlp.X})
    out = client.predict(adapted.spec.ref, digits_mlp.X, timeout_s=120)
    np.testing.assert_array_equal(column(out, "label"), label)
    np.testing.assert_allclose(column(out, "probabilities"), proba, rtol=1e-5, atol=1e-6)
    # Dynamic quantization takes one scale over a call's rows: jobs in flight together,
    # packed or not, must each get the answer of a call of their own (never merged or cut).
    pieces = [digits_mlp.X[i : i + n] for i, n in ((0, 7), (7, 300), (307, 40), (347, 250))]
    jobs = [client.submit(adapted.spec.ref, p) for p in pieces] + client.submit_many(adapted.spec.ref, pieces)
    for piece, job in zip(pieces * 2, jobs, strict=True):
        own = session.run(None, {"X": piece})[1]
        np.testing.assert_allclose(column(job.result(timeout_s=60), "probabilities"), own, rtol=1e-5, atol=1e-6)


def test_fp16_and_optimize_keep_results_and_register(
    client: Client, digits_mlp: Built, work_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = register(client, digits_mlp.directory)
    sample = work_dir / "cv-digits.parquet"
    if not sample.exists():
        write_sample(sample, client.registry.get(source), digits_mlp.X, digits_mlp.y)
    fp16 = quantize_model(client.registry, source, mode="fp16", sample=sample, labels="y")
    assert fp16.spec.device == "gpu" and fp16.spec.fallback == "cpu" and fp16.spec.inputs[0].dtype == "float32"
    assert fp16.report.throughput == () and "GPU" in fp16.report.note
    assert fp16.report.size_after_bytes < fp16.report.size_before_bytes and fp16.parity.ok
    code = main(["--redis-url", client.settings.redis_url, "optimize", source, "--sample", str(sample),
                 "--batch-sizes", "1,64"])  # fmt: skip
    assert code == 0 and "speedup" in capsys.readouterr().out
    optimized = optimize_model(client.registry, source, sample=sample, batch_sizes=(1,))
    assert optimized.parity.ok and optimized.spec.framework == "onnx"
    assert [t.batch_rows for t in optimized.report.throughput] == [1]
