"""Ensembles through real Redis and real worker processes: every fused result equals
the same fusion computed in-process from the members' own in-process outputs."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hetbatch.producers import Client, ConfigError, JobFailed
from hetbatch.producers.protocol.ensemble import EnsembleSpec
from hetbatch.worker.devtools.redis_server import RedisServer
from hetbatch.worker.fusion import MemberOutput, fuse
from hetbatch.worker.modelops.registration import register_path, write_config
from tests.kit.helpers import WorkerProcess, column, register
from tests.kit.models import Built, onnx_from_sklearn, sklearn_model

TIMEOUT_S = 120


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, dict):
        return "{" + ", ".join(f'"{k}" = {_toml(v)}' for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def ensemble_dir(
    directory: Path, members: list[dict[str, Any]], params: dict[str, Any] | None = None, **top: Any
) -> Path:
    """Write an ensemble's model.toml: top-level keys, [params], [[members]]."""
    lines = ['kind = "ensemble"'] + [f"{k} = {_toml(v)}" for k, v in top.items()]
    if params:
        lines += ["[params]"] + [f"{k} = {_toml(v)}" for k, v in params.items()]
    for m in members:
        lines += ["[[members]]"] + [f"{k} = {_toml(v)}" for k, v in m.items()]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.toml").write_text("\n".join(lines) + "\n")
    return directory


def permuted_onnx(directory: Path, name: str, built: Built, perm: list[int]) -> Built:
    """The estimator's ONNX conversion with its probability columns stored in ``perm`` order."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper
    from skl2onnx import to_onnx

    onx = to_onnx(built.model, built.X[:1].astype(np.float32), options={"zipmap": False}, target_opset=17)
    for node in onx.graph.node:
        for i, out in enumerate(node.output):
            if out == "probabilities":
                node.output[i] = "probabilities_sorted"
    onx.graph.initializer.append(numpy_helper.from_array(np.asarray(perm, np.int64), "perm"))
    onx.graph.node.append(helper.make_node("Gather", ["probabilities_sorted", "perm"], ["probabilities"], axis=1))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.onnx").write_bytes(onx.SerializeToString())
    classes = [int(built.model.classes_[p]) for p in perm]
    write_config(directory, name=name, framework="onnx", artifact="model.onnx", classes=classes)
    session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    return Built(directory, session, built.X, built.y)


def skops_dir(directory: Path, name: str, model: Any) -> Path:
    import skops.io as sio

    directory.mkdir(parents=True, exist_ok=True)
    sio.dump(model, directory / "model.skops")
    return write_config(directory, name=name, framework="sklearn", artifact="model.skops")


@dataclass
class Zoo:
    """Registered members, and their in-process outputs on ``X`` (noisy iris rows)."""

    X: np.ndarray
    y: np.ndarray
    forest: Built
    logreg: Built
    outputs: dict[str, dict[str, np.ndarray]]
    classes: dict[str, tuple[Any, ...]]

    def member(self, name: str, use: str, weight: float = 1.0) -> MemberOutput:
        return MemberOutput(name, self.outputs[name], use, weight, self.classes[name])


@pytest.fixture(scope="module")
def zoo(work_dir: Path, redis_url: str) -> Zoo:
    root = work_dir / "ensembles"
    forest = sklearn_model(root / "forest", "ens-forest", "iris")
    logreg = sklearn_model(root / "logreg", "ens-logreg", "iris", kind="logreg")
    forest_onnx = onnx_from_sklearn(root / "forest-onnx", "ens-forest-onnx", forest, classes=[0, 1, 2])
    perm = permuted_onnx(root / "logreg-perm", "ens-logreg-perm", logreg, [2, 0, 1])
    rng = np.random.default_rng(0)
    X = forest.X + rng.normal(0, 0.35, forest.X.shape)  # noise, so that members disagree now and then
    X32 = X.astype(np.float32)
    outputs = {
        "ens-forest": {"label": forest.model.predict(X), "probabilities": forest.model.predict_proba(X)},
        "ens-logreg": {"label": logreg.model.predict(X), "probabilities": logreg.model.predict_proba(X)},
    }
    for name, built in (("ens-forest-onnx", forest_onnx), ("ens-logreg-perm", perm)):
        label, proba = built.model.run(None, {"X": X32})
        outputs[name] = {"label": label, "probabilities": proba}
    classes = {
        "ens-forest": (0, 1, 2),
        "ens-logreg": (0, 1, 2),
        "ens-forest-onnx": (0, 1, 2),
        "ens-logreg-perm": (2, 0, 1),
    }
    with Client.from_url(redis_url) as client:
        for built in (forest, logreg, forest_onnx, perm):
            register(client, built.directory)
    return Zoo(X, forest.y, forest, logreg, outputs, classes)


def add(client: Client, directory: Path) -> EnsembleSpec:
    spec = register_path(client.registry, directory)
    assert isinstance(spec, EnsembleSpec)
    return spec


def test_mean_and_weighted_mean_across_frameworks_equal_in_process_fusion(
    client: Client, cpu_worker: WorkerProcess, zoo: Zoo, work_dir: Path
) -> None:
    names = ["ens-forest", "ens-forest-onnx", "ens-logreg"]
    add(client, ensemble_dir(work_dir / "e-mean", [{"name": n} for n in names], name="e-mean", include_members=True))
    job = client.submit("e-mean", zoo.X, chunk_rows=40)
    out = job.result(timeout_s=TIMEOUT_S)
    assert job.chunks == 4
    expected = fuse("mean", [zoo.member(n, "probabilities") for n in names], {"classes": [0, 1, 2]})
    np.testing.assert_allclose(column(out, "probabilities"), expected["probabilities"], atol=1e-6)
    for n in names:  # include_members: each member's raw outputs, as it gave them
        np.testing.assert_array_equal(column(out, f"{n}.label"), zoo.outputs[n]["label"])
        np.testing.assert_allclose(column(out, f"{n}.probabilities"), zoo.outputs[n]["probabilities"], atol=1e-6)

    members = [{"name": n, "weight": w} for n, w in zip(names, [1.0, 2.0, 3.0])]
    add(client, ensemble_dir(work_dir / "e-wmean", members, name="e-wmean", strategy="weighted_mean"))
    out = client.predict("e-wmean", zoo.X, timeout_s=TIMEOUT_S)
    expected = fuse(
        "weighted_mean", [zoo.member(n, "probabilities", w) for n, w in zip(names, [1, 2, 3])], {"classes": [0, 1, 2]}
    )
    np.testing.assert_allclose(column(out, "probabilities"), expected["probabilities"], atol=1e-6)
    assert out.column_names == ["probabilities"]


def test_hard_vote_equals_the_in_process_vote_exactly(
    client: Client, cpu_worker: WorkerProcess, zoo: Zoo, work_dir: Path
) -> None:
    names = ["ens-forest", "ens-logreg", "ens-logreg-perm", "ens-forest-onnx"]
    add(
        client,
        ensemble_dir(
            work_dir / "e-vote", [{"name": n} for n in names], {"kind": "hard"}, name="e-vote", strategy="vote"
        ),
    )
    out = client.predict("e-vote", zoo.X, timeout_s=TIMEOUT_S)
    expected = fuse("vote", [zoo.member(n, "label") for n in names], {"kind": "hard"})["label"]
    np.testing.assert_array_equal(column(out, "label"), expected)
    labels = np.stack([zoo.outputs[n]["label"] for n in names])
    assert (labels != labels[0]).any(), "the members never disagree: the test would not exercise the vote"


def test_soft_vote_aligns_permuted_class_columns_by_label(
    client: Client, cpu_worker: WorkerProcess, zoo: Zoo, work_dir: Path
) -> None:
    names = ["ens-forest", "ens-logreg-perm", "ens-logreg"]
    add(
        client,
        ensemble_dir(
            work_dir / "e-soft", [{"name": n} for n in names], {"kind": "soft"}, name="e-soft", strategy="vote"
        ),
    )
    out = client.predict("e-soft", zoo.X, timeout_s=TIMEOUT_S)
    by_label = fuse("vote", [zoo.member(n, "probabilities") for n in names], {"kind": "soft", "classes": [0, 1, 2]})
    np.testing.assert_allclose(column(out, "probabilities"), by_label["probabilities"], atol=1e-6)
    np.testing.assert_array_equal(column(out, "label"), by_label["label"])
    # The same members averaged by column position give other answers: alignment matters here.
    by_position = np.mean([zoo.outputs[n]["probabilities"] for n in names], axis=0)
    assert (by_position.argmax(axis=1) != column(out, "label")).sum() >= 5
    assert np.abs(by_position - column(out, "probabilities")).max() > 0.3


def test_stacked_meta_model_trained_on_out_of_fold_outputs(
    client: Client, cpu_worker: WorkerProcess, zoo: Zoo, work_dir: Path
) -> None:
    from sklearn.base import clone
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    names = ["ens-forest", "ens-logreg", "ens-logreg-perm"]
    X, y = zoo.forest.X, zoo.forest.y
    oof_forest = cross_val_predict(clone(zoo.forest.model), X, y, cv=5, method="predict_proba")
    oof_logreg = cross_val_predict(clone(zoo.logreg.model), X, y, cv=5, method="predict_proba")
    oof = np.hstack([oof_forest, oof_logreg, oof_logreg[:, [2, 0, 1]]])  # each member's own column order
    meta = LogisticRegression(max_iter=2000).fit(oof, y)
    register(client, skops_dir(work_dir / "e-meta", "ens-meta", meta))
    add(
        client,
        ensemble_dir(
            work_dir / "e-stack", [{"name": n} for n in names], {"meta": "ens-meta"}, name="e-stack", strategy="stack"
        ),
    )
    out = client.predict("e-stack", zoo.X, timeout_s=TIMEOUT_S)
    features = fuse("stack", [zoo.member(n, "probabilities") for n in names], {})["features"]
    np.testing.assert_array_equal(column(out, "label"), meta.predict(features))
    np.testing.assert_allclose(column(out, "probabilities"), meta.predict_proba(features), atol=1e-6)


def test_chain_feeds_a_scaler_model_into_an_onnx_classifier(
    client: Client, cpu_worker: WorkerProcess, zoo: Zoo, work_dir: Path
) -> None:
    import onnxruntime as ort
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    X, y = zoo.forest.X, zoo.forest.y
    scaler = StandardScaler().fit(X)
    clf = LogisticRegression(max_iter=2000).fit(scaler.transform(X), y)
    register(client, skops_dir(work_dir / "e-scaler", "ens-scaler", scaler))
    onx = to_onnx(clf, scaler.transform(X)[:1].astype(np.float32), options={"zipmap": False}, target_opset=17)
    (work_dir / "e-clf").mkdir()
    (work_dir / "e-clf" / "model.onnx").write_bytes(onx.SerializeToString())
    register(
        client,
        write_config(work_dir / "e-clf", name="ens-clf", framework="onnx", artifact="model.onnx", classes=[0, 1, 2]),
    )
    links = [{"from": "ens-scaler", "to": "ens-clf", "map": {"features": "X"}}]
    members = [{"name": "ens-clf"}, {"name": "ens-scaler"}]  # listed out of order: the links decide
    spec = add(client, ensemble_dir(work_dir / "e-chain", members, {"links": links}, name="e-chain", strategy="chain"))
    assert [m.ref.split("@")[0] for m in spec.members] == ["ens-scaler", "ens-clf"]
    out = client.predict("e-chain", zoo.X, timeout_s=TIMEOUT_S, chunk_rows=64)
    session = ort.InferenceSession(str(work_dir / "e-clf" / "model.onnx"), providers=["CPUExecutionProvider"])
    label, proba = session.run(None, {"X": scaler.transform(zoo.X).astype(np.float32)})
    np.testing.assert_array_equal(column(out, "label"), label)
    np.testing.assert_allclose(column(out, "probabilities"), proba, atol=1e-6)


def test_select_by_rule_routes_rows_to_different_members(
    client: Client, cpu_worker: WorkerProcess, zoo: Zoo, work_dir: Path
) -> None:
    rule = {"input": "X", "index": 2, "bins": [2.5], "routes": ["ens-forest", "ens-logreg"]}
    members = [{"name": "ens-forest"}, {"name": "ens-logreg"}]
    add(
        client,
        ensemble_dir(
            work_dir / "e-route", members, {"rule": rule}, name="e-route", strategy="select", include_members=True
        ),
    )
    out = client.predict("e-route", zoo.X, timeout_s=TIMEOUT_S)
    short = zoo.X[:, 2] < 2.5
    assert 0 < short.sum() < len(short)
    for name in ("label", "probabilities"):
        expected = np.where(
            short.reshape(-1, *([1] * (zoo.outputs["ens-forest"][name].ndim - 1))),
            zoo.outputs["ens-forest"][name],
            zoo.outputs["ens-logreg"][name],
        )
        np.testing.assert_allclose(column(out, name), expected, atol=1e-6)
    assert column(out, "member")[short][0].startswith("ens-forest@")


def test_evaluate_records_the_best_member_and_select_runs_it(
    client: Client, cpu_worker: WorkerProcess, zoo: Zoo, work_dir: Path, redis_url: str
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.tree import DecisionTreeClassifier

    from hetbatch.worker.cli import main

    stump = DecisionTreeClassifier(max_depth=1, random_state=0).fit(zoo.forest.X, zoo.y)
    register(client, skops_dir(work_dir / "e-stump", "ens-stump", stump))
    names = ["ens-stump", "ens-forest-onnx", "ens-logreg"]
    first = add(
        client, ensemble_dir(work_dir / "e-best", [{"name": n} for n in names], name="e-best", strategy="select")
    )
    data = pa.table({"X": pa.FixedSizeListArray.from_arrays(pa.array(zoo.X.ravel()), 4), "species": zoo.y})
    pq.write_table(data, work_dir / "labelled.parquet")
    code = main(
        [
            "--redis-url",
            redis_url,
            "ensembles",
            "evaluate",
            "e-best",
            "--data",
            str(work_dir / "labelled.parquet"),
            "--label",
            "species",
        ]
    )
    assert code == 0
    client._specs.clear()
    spec = client.spec("e-best")
    assert spec.version != first.version
    outputs = {"ens-stump": stump.predict(zoo.X), **{n: zoo.outputs[n]["label"] for n in names[1:]}}
    accuracy = {n: float((outputs[n] == zoo.y).mean()) for n in names}
    scores = {ref.split("@")[0]: s for ref, s in spec.params["scores"].items()}
    assert scores == pytest.approx(accuracy)
    best = max(accuracy, key=lambda n: accuracy[n])
    assert spec.params["choice"].split("@")[0] == best and spec.params["metric"] == "accuracy"
    out = client.predict("e-best", zoo.X, timeout_s=TIMEOUT_S)
    np.testing.assert_array_equal(column(out, "label"), outputs[best])


def test_a_failed_member_fails_the_job_by_name_unless_the_quorum_allows(
    client: Client, cpu_worker: WorkerProcess, zoo: Zoo, work_dir: Path
) -> None:
    broken = sklearn_model(work_dir / "e-broken", "ens-broken", "iris", kind="logreg")
    register(client, broken.directory)
    names = ["ens-forest", "ens-forest-onnx", "ens-broken"]
    add(client, ensemble_dir(work_dir / "e-all", [{"name": n} for n in names], name="e-all"))
    add(client, ensemble_dir(work_dir / "e-quorum", [{"name": n} for n in names], name="e-quorum", min_members=2))
    (broken.directory / "model.skops").write_bytes(b"not a model any more")  # the worker's load now fails
    with pytest.raises(JobFailed, match="ens-broken") as info:
        client.predict("e-all", zoo.X, timeout_s=TIMEOUT_S)
    assert info.value.remote_type == "MemberFailed"
    assert info.value.remote_details["member"].startswith("ens-broken@")
    out = client.predict("e-quorum", zoo.X, timeout_s=TIMEOUT_S)
    expected = fuse("mean", [zoo.member(n, "probabilities") for n in names[:2]], {"classes": [0, 1, 2]})
    np.testing.assert_allclose(column(out, "probabilities"), expected["probabilities"], atol=1e-6)
    assert cpu_worker.alive()


def test_bad_ensemble_configs_are_refused_at_registration(
    client: Client, zoo: Zoo, work_dir: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from sklearn.linear_model import LinearRegression

    from hetbatch.worker.cli import main

    register(client, skops_dir(work_dir / "e-reg", "ens-regressor", LinearRegression().fit(zoo.forest.X, zoo.y * 1.0)))
    bad = work_dir / "bad"

    def refused(name: str, members: list[dict[str, Any]], params: dict[str, Any] | None = None, **top: Any) -> str:
        with pytest.raises(ConfigError) as info:
            register_path(client.registry, ensemble_dir(bad / name, members, params, name=name, **top))
        return str(info.value)

    three = [{"name": "ens-forest"}, {"name": "ens-logreg"}, {"name": "ens-forest-onnx"}]
    assert "unknown member 'ens-nope'" in refused("b1", [{"name": "ens-forest"}, {"name": "ens-nope"}])
    msg = refused("b2", [{"name": "ens-forest"}, {"name": "ens-regressor", "output": "label"}])
    assert "incompatible output shapes" in msg
    assert "3 weights for 2 members" in refused("b3", three[:2], {"weights": [1, 2, 3]}, strategy="weighted_mean")
    assert "no weight for" in refused("b4", [{"name": "ens-forest", "weight": 2.0}, {"name": "ens-logreg"}])
    links = [{"from": "ens-forest", "to": "ens-logreg"}, {"from": "ens-logreg", "to": "ens-forest"}]
    assert "cycle in chain: ens-forest -> ens-logreg -> ens-forest" in refused(
        "b5", three[:2], {"links": links}, strategy="chain"
    )
    assert "is the ensemble itself" in refused("b6", [{"name": "ens-forest"}, {"name": "b6"}])
    no_classes = work_dir / "e-onnx-noclasses"
    onnx_from_sklearn(no_classes, "ens-onnx-noclasses", zoo.forest)
    register(client, no_classes)
    assert "needs classes" in refused(
        "b7", [{"name": "ens-forest"}, {"name": "ens-onnx-noclasses"}], {"kind": "soft"}, strategy="vote"
    )
    assert "min_members" in refused("b8", three, min_members=4)
    # The CLI says the same, and exits 2.
    code = main(
        [
            "--redis-url",
            redis_url,
            "models",
            "register",
            str(ensemble_dir(bad / "b9", [{"name": "ens-nope"}], name="b9")),
        ]
    )
    assert code == 2 and "unknown member 'ens-nope'" in capsys.readouterr().err
    assert "b1" not in client.registry.names()


def test_member_results_wait_in_redis_until_a_fusion_worker_comes(zoo: Zoo, work_dir: Path) -> None:
    """With no worker on fusion.cpu, members finish and their results stay stored; a
    fusion worker started later (here after the member worker was SIGKILLed) fuses them."""
    with RedisServer() as server, Client.from_url(server.url) as client:
        for built in (zoo.forest, zoo.logreg):
            register(client, built.directory)
        names = ["ens-forest", "ens-logreg"]
        add(client, ensemble_dir(work_dir / "e-late", [{"name": n} for n in names], name="e-late"))
        members = WorkerProcess(server.url, work_dir, "--queues", "sklearn.cpu")
        try:
            job = client.submit("e-late", zoo.X)
            keys = [client.keys.result(f"{job.id}~0.{slot}", 0) for slot in range(2)]
            # kombu keeps one list per priority level: fusion.cpu, fusion.cpu:1, ...
            queued = ["fusion.cpu", *(f"fusion.cpu:{p}" for p in range(1, 10))]
            deadline = time.monotonic() + TIMEOUT_S
            while sum(client.redis.llen(q) for q in queued) == 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert client.redis.exists(*keys) == 2
            assert sum(client.redis.llen(q) for q in queued) == 1 and not job.done()
        finally:
            members.kill()
            members.stop()
        fusion = WorkerProcess(server.url, work_dir, "--queues", "fusion.cpu")
        try:
            out = job.result(timeout_s=TIMEOUT_S)
        finally:
            fusion.stop()
        expected = fuse("mean", [zoo.member(n, "probabilities") for n in names], {"classes": [0, 1, 2]})
        np.testing.assert_allclose(column(out, "probabilities"), expected["probabilities"], atol=1e-6)
        assert client.redis.exists(*keys) == 0  # intermediate results are dropped once fused
