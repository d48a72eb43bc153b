"""Text as a first-class input, through real Redis and a real worker: a scikit-learn
TF-IDF + logistic regression pipeline served natively (skops, one string per row) and as
its skl2onnx conversion (a ``[None, 1]`` string tensor, ``fixed_size_list<string, 1>`` on
the wire). Documents with accents, CJK, punctuation and empty strings; string labels out.
Each served answer equals its own model in-process, and the two models agree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from hetbatch.producers import Client, SchemaMismatch
from tests.kit.helpers import WorkerProcess, column, register
from tests.kit.models_rows import corpus, text_classifier

ROWS = 3000


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return corpus(ROWS, seed=3)[0]


def test_a_skops_text_pipeline_serves_strings_as_in_process(
    client: Client, cpu_worker: WorkerProcess, work_dir: Path, docs: list[str]
) -> None:
    directory, pipeline = text_classifier(work_dir / "text-skops", "text-skops", "sklearn")
    ref = register(client, directory)
    spec = client.spec(ref)
    assert [(t.name, t.dtype, t.shape) for t in spec.inputs] == [("X", "string", ())]
    want_label, want_proba = pipeline.predict(docs), pipeline.predict_proba(docs)
    # A dict of strings, a DataFrame column and an Arrow table, cut into several chunks.
    sources = {
        "dict": {"X": docs},
        "pandas": pd.DataFrame({"X": docs}),
        "arrow": pa.table({"X": pa.array(docs, pa.string())}),
    }
    for what, data in sources.items():
        job = client.submit(ref, data, chunk_rows=700)
        assert job.chunks == 5, what
        table = job.result(timeout_s=120)
        assert table.column("label").type == pa.string(), what
        assert table.column("label").to_pylist() == list(want_label), what
        np.testing.assert_allclose(column(table, "probabilities"), want_proba, rtol=0, atol=1e-12, err_msg=what)


def test_its_skl2onnx_conversion_takes_a_string_tensor_and_agrees(
    client: Client, cpu_worker: WorkerProcess, work_dir: Path, docs: list[str]
) -> None:
    directory, session = text_classifier(work_dir / "text-onnx", "text-onnx", "onnx")
    ref = register(client, directory)
    assert [(t.name, t.dtype, t.shape) for t in client.spec(ref).inputs] == [("text", "string", (1,))]
    want_label, want_proba = session.run(["label", "probabilities"], {"text": np.array(docs, object).reshape(-1, 1)})
    # One string per row (a list, a DataFrame column) fills the (1,) shape, as does (N, 1).
    sources = {
        "list": {"text": docs},
        "pandas": pd.DataFrame({"text": docs}),
        "(N, 1)": {"text": np.array(docs, dtype=object).reshape(-1, 1)},
    }
    for what, data in sources.items():
        table = client.predict(ref, data, chunk_rows=1000, timeout_s=120)
        assert table.column("label").to_pylist() == list(want_label), what
        np.testing.assert_allclose(column(table, "probabilities"), want_proba, rtol=0, atol=1e-6, err_msg=what)
    # The conversion answers as the native pipeline does (float32 against float64).
    _, pipeline = text_classifier(work_dir / "text-skops-again", "unused", "sklearn")
    assert list(want_label) == list(pipeline.predict(docs))
    np.testing.assert_allclose(want_proba, pipeline.predict_proba(docs), rtol=0, atol=1e-5)


def test_numbers_for_a_text_input_are_refused_by_name(
    client: Client, cpu_worker: WorkerProcess, work_dir: Path
) -> None:
    directory, _ = text_classifier(work_dir / "text-refuse", "text-refuse", "onnx")
    ref = register(client, directory)
    with pytest.raises(SchemaMismatch, match=r"text.*cannot be cast to string"):
        client.submit(ref, {"text": np.arange(4.0)})
    with pytest.raises(SchemaMismatch, match=r"text.*wrong shape"):
        client.submit(ref, {"text": np.array([["a", "b"]] * 3, dtype=object)})
