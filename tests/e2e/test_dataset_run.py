"""Dataset runs through a real Redis and a real worker: parts, resume after SIGKILL,
quarantined rows and progress lines, every answer compared with the model in-process.

Run as ``python -m tests.e2e.test_dataset_run EVENT N OPTIONS_JSON`` this file is also the
driver the resume test kills: a ``run_dataset`` that SIGKILLs itself at the N-th EVENT.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hetbatch.producers import Client
from hetbatch.producers.dataset import (
    ERROR_COLUMNS,
    MANIFEST_NAME,
    SUCCESS_NAME,
    ManifestConflict,
    RunOptions,
    run_dataset,
)
from tests.kit.helpers import ROOT, WorkerProcess, column, register
from tests.kit.models import Built, onnx_mlp

FEATURES = [f"f{i}" for i in range(8)]
DATES = ["2024-01-01", "2024-01-02", "2024-01-03", "2024-01-04"]


def write_dataset(root: Path, files_per_date: int = 2, rows: int = 4000, seed: int = 0) -> list[Path]:
    """Hive-partitioned Parquet files (``date=.../part-k.parquet``), row groups of 1,000 rows."""
    rng = np.random.default_rng(seed)
    paths, next_id = [], 0
    for date in DATES:
        for k in range(files_per_date):
            X = rng.standard_normal((rows, len(FEATURES))).astype(np.float32)
            table = pa.table({"id": np.arange(next_id, next_id + rows), **{f: X[:, i] for i, f in enumerate(FEATURES)}})
            path = root / f"date={date}" / f"part-{k}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path, row_group_size=1000)
            paths.append(path)
            next_id += rows
    return paths


def expected(built: Built, path: Path) -> np.ndarray:
    table = pq.read_table(path)
    X = np.stack([table.column(f).to_numpy() for f in FEATURES], axis=1)
    return np.asarray(built.model.run(None, {"x": X})[0])


def output_of(out: Path, rel: str) -> pa.Table:
    """The output rows of one input file: its part files, in order."""
    stem = out / rel[: -len(".parquet")]
    files = sorted(stem.parent.glob(f"{stem.name}-*.parquet")) or [out / rel]
    return pa.concat_tables([pq.read_table(f) for f in files])


def assert_output_equal(built: Built, inputs: list[Path], root: Path, out: Path) -> None:
    for path in inputs:
        got = output_of(out, str(path.relative_to(root)))
        np.testing.assert_array_equal(got.column("id").to_numpy(), pq.read_table(path).column("id").to_numpy())
        np.testing.assert_allclose(column(got, "probabilities"), expected(built, path), atol=1e-6)


@pytest.fixture(scope="module")
def mlp(work_dir: Path) -> Built:
    inputs = [{"name": "x", "dtype": "float32", "shape": [8], "columns": FEATURES}]
    return onnx_mlp(work_dir / "ds-mlp", "ds-mlp", features=8, hidden=32, classes=4, inputs=inputs)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("dataset")
    return root, write_dataset(root)


def cli(redis_url: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    command = [sys.executable, "-m", "hetbatch", "--redis-url", redis_url, "run", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def test_a_hive_dataset_is_scored_part_by_part_equal_to_in_process(
    client: Client, cpu_worker: WorkerProcess, mlp: Built, dataset: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    register(client, mlp.directory)
    root, inputs = dataset
    out = tmp_path / "out"
    done = cli(client.settings.redis_url, "--model", "ds-mlp", "--input", str(root), "--output", str(out),
               "--keep", "id,date", "--batch-rows", "700", "--part-rows", "2000", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    summary = lines[-1]
    assert summary["event"] == "summary" and summary["rows_scored"] == 32_000 and summary["parts_total"] == 16
    assert lines[-2]["event"] == "progress" and lines[-2]["rows_done"] == lines[-2]["rows_total"] == 32_000
    assert {"rows_per_s", "eta_s", "rejected", "parts_done"} <= set(lines[-2])
    assert_output_equal(mlp, inputs, root, out)
    assert (out / SUCCESS_NAME).exists() and json.loads((out / MANIFEST_NAME).read_text())["complete"]
    back = pq.read_table(out, partitioning="hive")  # the partition column comes back from the path
    assert sorted(set(back.column("date").to_pylist())) == DATES and back.num_rows == 32_000
    again = cli(client.settings.redis_url, "--model", "ds-mlp", "--input", str(root), "--output", str(out),
                "--keep", "id,date", "--batch-rows", "700", "--part-rows", "2000", "--json")  # fmt: skip
    assert json.loads(again.stdout.splitlines()[-1])["parts_skipped"] == 16


def test_the_same_run_on_an_s3_compatible_server_gives_equal_output(
    client: Client, cpu_worker: WorkerProcess, mlp: Built, dataset: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    pytest.importorskip("moto.server")
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    register(client, mlp.directory)
    root, inputs = dataset
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        s3 = pafs.S3FileSystem(
            access_key="testing", secret_key="testing", region="us-east-1", scheme="http",
            endpoint_override=f"127.0.0.1:{port}", allow_bucket_creation=True,
        )  # fmt: skip
        s3.create_dir("lake")
        pafs.copy_files(str(root), "lake/events", destination_filesystem=s3)
        env = {**creds, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        done = cli(client.settings.redis_url, "--model", "ds-mlp", "--input", "s3://lake/events",
                   "--output", "s3://lake/scores", "--keep", "id", "--batch-rows", "1500", "--part-rows", "2000",
                   "--quiet", env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr
        local = tmp_path / "scores"
        pafs.copy_files("lake/scores", str(local), source_filesystem=s3)
        assert_output_equal(mlp, inputs, root, local)
        assert (local / SUCCESS_NAME).exists()
        assert not [
            i.path for i in s3.get_file_info(pafs.FileSelector("lake/scores", recursive=True)) if "/." in i.path
        ]
    finally:
        server.stop()


def _driver(event: str, n: int, options: dict[str, Any], redis_url: str, log: str) -> None:
    """The killed client: appends every event to ``log``; SIGKILLs itself at the n-th ``event``."""
    seen: dict[str, int] = {}

    def hook(name: str, part: str) -> None:
        with open(log, "a") as fh:
            fh.write(f"{name} {part}\n")
        seen[name] = seen.get(name, 0) + 1
        if name == event and seen[name] == n:
            os.kill(os.getpid(), signal.SIGKILL)

    with Client.from_url(redis_url) as client:
        fixed = {**options, "inputs": tuple(options["inputs"]), "keep": tuple(options["keep"])}
        run_dataset(RunOptions(**fixed, events=hook), client)


def _run_driver(redis_url: str, event: str, n: int, options: dict[str, Any], log: Path, kill_after_s: float = 0):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    argv = [sys.executable, "-m", "tests.e2e.test_dataset_run", event, str(n), json.dumps(options), redis_url, str(log)]
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    if kill_after_s:
        deadline = time.monotonic() + 60
        while "batch" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(kill_after_s)
        proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_a_run_killed_at_six_points_and_resumed_equals_an_uninterrupted_run(
    client: Client, cpu_worker: WorkerProcess, mlp: Built, dataset: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    register(client, mlp.directory)
    root, inputs = dataset
    out, log = tmp_path / "out", tmp_path / "events.log"
    options = {"model": "ds-mlp", "inputs": [str(root)], "output": str(out), "keep": ["id"], "batch_rows": 700,
               "part_rows": 2000, "progress": "quiet"}  # fmt: skip
    # Mid-part, before a move, between the move and the manifest (during the commit), just
    # after a commit, mid-part again, and at a random moment from outside.
    kills = [("batch", 3), ("staged", 2), ("moved", 2), ("committed", 1), ("batch", 5)]
    rng = np.random.default_rng(7)
    started_parts: set[str] = set()
    committed: set[str] = set()
    for event, n in [*kills, ("random", 0)]:
        log.unlink(missing_ok=True)
        delay = float(rng.uniform(0.05, 0.4)) if event == "random" else 0
        code, err = _run_driver(client.settings.redis_url, event, n, dict(options), log, kill_after_s=delay)
        # A kill from outside can come after the run ended (the parts left were few and fast).
        assert code == -signal.SIGKILL or (event == "random" and code == 0), err
        events = [line.split(" ", 1) for line in log.read_text().splitlines()]
        begun = {p for e, p in events if e == "batch"}
        now_committed = {p for e, p in events if e == "committed"}
        started_parts |= begun - now_committed
        committed |= now_committed
        manifest = json.loads((out / MANIFEST_NAME).read_text())
        if event == "random":  # killed from outside: a commit can be recorded before its event line
            assert committed <= set(manifest["parts"]) <= committed | begun
            committed = set(manifest["parts"])
            started_parts -= committed
        assert set(manifest["parts"]) == committed  # exactly what was committed, nothing half
        if (out / SUCCESS_NAME).exists():  # only a kill from outside after the last commit
            assert event == "random" and len(committed) == 16
        for rel in manifest["parts"]:
            assert pq.read_metadata(out / manifest["parts"][rel]["output"]).num_rows == 2000
    log.unlink(missing_ok=True)
    code, err = _run_driver(client.settings.redis_url, "none", 0, dict(options), log)
    assert code == 0, err
    assert_output_equal(mlp, inputs, root, out)
    leftovers = [p for p in out.rglob(".*") if p.is_file()]
    assert not leftovers, leftovers
    total = pq.read_table(out, partitioning="hive").num_rows
    assert total == 32_000  # no row missing, none twice
    print(f"\nresume: 6 kills, {len(committed)} of 16 parts committed before the last run, "
          f"{len(started_parts)} parts begun and not committed by killed runs (re-scored later)")  # fmt: skip


def test_a_resumed_run_refuses_a_new_model_version_or_a_changed_input(
    client: Client, cpu_worker: WorkerProcess, mlp: Built, tmp_path: Path
) -> None:
    register(client, mlp.directory)
    root = tmp_path / "in"
    inputs = write_dataset(root, files_per_date=1, rows=1000)
    out = tmp_path / "out"
    opts = RunOptions("ds-mlp", (str(root),), str(out), keep=("id",), progress="quiet")

    def interrupt(event: str, part: str) -> None:
        if event == "committed":
            raise KeyboardInterrupt  # an interrupted run: one part committed

    with pytest.raises(KeyboardInterrupt):
        run_dataset(replace(opts, events=interrupt), client)
    first = json.loads((out / MANIFEST_NAME).read_text())["model"]
    newer = register(client, mlp.directory)  # a new version under the same name
    with pytest.raises(ManifestConflict, match=f"started with model {first}, not {newer}"):
        run_dataset(opts, client)
    summary = run_dataset(replace(opts, model=first), client)
    assert (summary.parts_skipped, summary.parts_scored, summary.rows_skipped) == (1, 3, 1000)
    assert_output_equal(mlp, inputs, root, out)
    with pytest.raises(KeyboardInterrupt):
        run_dataset(replace(opts, restart=True, events=interrupt), client)
    pq.write_table(pq.read_table(inputs[-1]).slice(0, 500), inputs[-1])
    with pytest.raises(ManifestConflict, match="input changed"):
        run_dataset(opts, client)


def test_a_failing_run_names_file_row_and_column_and_leaves_no_output(
    client: Client, cpu_worker: WorkerProcess, mlp: Built, tmp_path: Path
) -> None:
    register(client, mlp.directory)
    rng = np.random.default_rng(1)
    X = rng.standard_normal((6037, 8)).astype(np.float32)
    cols: dict[str, Any] = {"id": np.arange(6037), **{f: X[:, i] for i, f in enumerate(FEATURES)}}
    cols["f5"] = pa.array([None if i == 4321 else float(v) for i, v in enumerate(X[:, 5])], pa.float32())
    pq.write_table(pa.table(cols), tmp_path / "in.parquet", row_group_size=1000)
    out = tmp_path / "scored.parquet"
    done = cli(client.settings.redis_url, "--model", "ds-mlp", "--input", str(tmp_path / "in.parquet"),
               "--output", str(out), "--batch-rows", "1000", "--part-rows", "2000", "--quiet")  # fmt: skip
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "in.parquet: row 4,321 (0-based), column 'f5': NullValue" in done.stderr
    assert not out.exists()
    bad_keep = cli(client.settings.redis_url, "--model", "ds-mlp", "--input", str(tmp_path / "in.parquet"),
                   "--output", str(out), "--keep", "no_such_col", "--quiet")  # fmt: skip
    assert bad_keep.returncode == 2 and len(bad_keep.stderr.strip().splitlines()) == 1
    assert "--keep no_such_col: no such column" in bad_keep.stderr


def two_input_model(directory: Path) -> Any:
    """ONNX: concat(a[2] from flat columns a0, a1; b[4] from a list column) -> linear -> softmax."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from hetbatch.worker.modelops.config import write_config

    w = numpy_helper.from_array(np.random.default_rng(3).standard_normal((6, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Concat", ["a", "b"], ["ab"], axis=1),
            helper.make_node("MatMul", ["ab", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "two",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, 2]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [None, 4]),
        ],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 3])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(model, directory / "model.onnx")
    inputs = [
        {"name": "a", "dtype": "float32", "shape": [2], "columns": ["a0", "a1"]},
        {"name": "b", "dtype": "float32", "shape": [4]},
    ]
    write_config(directory, name="ds-two", framework="onnx", artifact="model.onnx", nan="reject", inputs=inputs)
    return ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])


def test_quarantine_sets_aside_five_kinds_of_bad_rows_and_scores_the_rest(
    client: Client, cpu_worker: WorkerProcess, tmp_path: Path
) -> None:
    session = two_input_model(tmp_path / "two")
    register(client, tmp_path / "two")
    rows, rng = 10_000, np.random.default_rng(5)
    a0 = rng.standard_normal(rows).astype(np.float32)
    a1 = rng.integers(-1000, 1000, rows).astype(np.int64)  # int64 into float32: exact for these values
    b = rng.standard_normal((rows, 4)).astype(np.float32)
    bad = rng.choice(rows, 100, replace=False)
    kinds = dict(zip(bad.tolist(), ["NullValue", "NonFinite", "NonFinite", "LossyCast", "WrongShape"] * 20))
    a0_list: list[float | None] = a0.tolist()
    b_list = b.tolist()
    for slot_of, i in enumerate(kinds):
        slot = slot_of % 5
        if slot == 0:
            a0_list[i] = None
        elif slot == 1:
            a0_list[i] = float("nan")
        elif slot == 2:
            b_list[i][2] = float("inf")
        elif slot == 3:
            a1[i] = 2**24 + 1
        else:
            b_list[i] = b_list[i][:3]
    table = pa.table({"id": np.arange(rows), "a0": pa.array(a0_list, pa.float32()), "a1": a1,
                      "b": pa.array(b_list, pa.list_(pa.float32()))})  # fmt: skip
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=2500)
    out, rejects = tmp_path / "out", tmp_path / "rejects"
    done = cli(client.settings.redis_url, "--model", "ds-two", "--input", str(tmp_path / "in.parquet"),
               "--output", str(out), "--keep", "id", "--on-error", "quarantine", "--rejects", str(rejects),
               "--batch-rows", "1024", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["rows_rejected"] == 100 and summary["rows_scored"] == 9_900
    got = pq.read_table(out / "in.parquet")
    good = np.setdiff1d(np.arange(rows), bad)
    np.testing.assert_array_equal(got.column("id").to_numpy(), good)
    X = {"a": np.stack([a0[good], a1[good].astype(np.float32)], axis=1), "b": b[good]}
    np.testing.assert_allclose(column(got, "probabilities"), session.run(None, X)[0], atol=1e-6)
    side = pq.read_table(rejects / "in.parquet")
    assert side.column_names == ["id", "a0", "a1", "b", *ERROR_COLUMNS]
    np.testing.assert_array_equal(side.column("hetbatch_row").to_numpy(), np.sort(bad))
    np.testing.assert_array_equal(side.column("id").to_numpy(), np.sort(bad))
    by_row = dict(zip(side.column("hetbatch_row").to_pylist(), side.column("hetbatch_error_type").to_pylist()))
    assert by_row == kinds
    assert all(side.column("hetbatch_error_message").to_pylist())


if __name__ == "__main__":
    _driver(sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4], sys.argv[5])
