"""Traces end to end: a producer's submit spans travel in the envelopes, and the worker's
batch span (another process) links every job it merged, with the result write under it;
an ensemble's fusion span links its job's submit, with its result write under it.

Real Redis, a real worker process and a real model; every result is compared with the
model's in-process predictions. The producer's spans are kept in memory; the worker's
are written to a file by ``tests.kit.spans``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from hetbatch.producers import Client
from hetbatch.producers.aio import AsyncClient
from hetbatch.producers.protocol import tracing
from hetbatch.producers.protocol.keys import Keys, lane_list
from hetbatch.worker.devtools.redis_server import RedisServer
from hetbatch.worker.modelops.registration import register_path
from tests.e2e.test_ensembles import ensemble_dir
from tests.kit import spans
from tests.kit.helpers import WorkerProcess, column, register
from tests.kit.models import Built, sklearn_model

QUEUE = "sklearn.cpu"


@pytest.fixture(scope="module")
def iris(work_dir: Path) -> Built:
    return sklearn_model(work_dir / "traced-iris", "traced-iris", "iris")


@pytest.fixture(scope="module")
def logreg(work_dir: Path) -> Built:
    return sklearn_model(work_dir / "traced-logreg", "traced-logreg", "iris", kind="logreg")


@pytest.fixture()
def exporter(monkeypatch: pytest.MonkeyPatch) -> Any:
    """This process's spans, in memory (the module's tracer patched: the global provider
    can be set once per process); tracing goes back off after the test."""
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    monkeypatch.setattr(tracing, "_tracer", lambda: provider.get_tracer(tracing.TRACER))
    monkeypatch.setattr(tracing, "_on", False)
    return memory


def _await_spans(path: Path, done: Any, worker: WorkerProcess) -> list[dict[str, Any]]:
    """The worker's spans once ``done(spans)`` holds (spans end just after the results are stored)."""
    deadline = time.monotonic() + 30
    while not done(found := spans.read(path)):
        assert time.monotonic() < deadline, f"spans seen: {[s['name'] for s in found]}\n{worker.output()[-3000:]}"
        time.sleep(0.05)
    return found


def test_batch_and_fusion_spans_link_the_submits_and_result_writes_are_their_children(
    redis_server: RedisServer, iris: Built, logreg: Built, work_dir: Path, exporter: Any
) -> None:
    path = work_dir / f"spans-{time.monotonic_ns()}.jsonl"
    env = {"HETBATCH_TRACING": "1", spans.ENV: str(path), "PYTHONPATH": str(spans.SITE)}
    workers: list[WorkerProcess] = []

    async def async_submit(sync_job: Any) -> tuple[pa.Table, pa.Table]:
        async with AsyncClient.from_url(redis_server.url, lane_max_rows=16, tracing=True) as aclient:
            with tracing._tracer().start_as_current_span("caller"):  # the service's own span
                job = await aclient.submit("traced-iris", iris.X[3:8])
            # Both jobs wait on the lane: the worker pops them in one batch.
            workers.append(await asyncio.to_thread(WorkerProcess, redis_server.url, work_dir, env=env))
            return await asyncio.to_thread(sync_job.result, timeout_s=60), await job.result(timeout_s=60)

    with Client.from_url(redis_server.url, lane_max_rows=16, tracing=True) as client:
        register(client, iris.directory)
        register(client, logreg.directory)
        members = [{"name": "traced-iris"}, {"name": "traced-logreg"}]
        register_path(client.registry, ensemble_dir(work_dir / "traced-mean", members, name="traced-mean"))
        # What the heartbeat of a worker that drains the lane keeps fresh: jobs go on the
        # lane before the worker starts.
        client.redis.set(Keys().alive(lane_list(QUEUE)), "test", px=120_000)
        first = client.submit("traced-iris", iris.X[:3])
        try:
            out_a, out_b = asyncio.run(async_submit(first))
            np.testing.assert_array_equal(column(out_a, "label"), iris.model.predict(iris.X[:3]))
            np.testing.assert_array_equal(column(out_b, "label"), iris.model.predict(iris.X[3:8]))

            def batch_and_store(found: list[dict[str, Any]]) -> bool:
                names = [s["name"] for s in found]
                return "hetbatch.batch" in names and "hetbatch.store" in names

            found = _await_spans(path, batch_and_store, workers[0])
            lane_submits = list(exporter.get_finished_spans())
            # An ensemble job: its member tasks go by Celery, then the fusion task runs.
            mean = client.submit("traced-mean", iris.X[:20])
            (submitted_mean,) = [
                s for s in exporter.get_finished_spans() if s.attributes.get("hetbatch.job") == mean.id
            ]
            mean_link = [f"{submitted_mean.context.trace_id:032x}", f"{submitted_mean.context.span_id:016x}"]
            expected = (iris.model.predict_proba(iris.X[:20]) + logreg.model.predict_proba(iris.X[:20])) / 2
            np.testing.assert_allclose(column(mean.result(timeout_s=60), "probabilities"), expected, atol=1e-6)

            def fused(found: list[dict[str, Any]]) -> bool:
                fuse = [s for s in found if s["name"] == "hetbatch.fuse"]
                members = [s for s in found if s["name"] == "hetbatch.batch" and mean_link in s["links"]]
                return bool(fuse) and len(members) == 2 and any(s["parent"] == fuse[0]["span_id"] for s in found)

            found_later = _await_spans(path, fused, workers[0])
        finally:
            for worker in workers:
                worker.stop()
    submits = [s for s in lane_submits if s.name == "hetbatch.submit"]
    assert len(submits) == 2
    # The AsyncClient's submit (in a thread) is a child of the span its caller was in.
    (caller,) = [s for s in lane_submits if s.name == "caller"]
    assert [s.parent.span_id for s in submits if s.parent is not None] == [caller.context.span_id]
    submitted = {(f"{s.context.trace_id:032x}", f"{s.context.span_id:016x}") for s in submits}
    (batch,) = [s for s in found if s["name"] == "hetbatch.batch"]
    assert {tuple(link) for link in batch["links"]} == submitted
    assert batch["attributes"]["hetbatch.tasks"] == 2
    (store,) = [s for s in found if s["name"] == "hetbatch.store"]
    assert store["parent"] == batch["span_id"] and store["trace_id"] == batch["trace_id"]
    # The model calls that ran the two jobs' rows (one call, or two when the second job
    # came after the batcher's wait) link each submit once.
    predicts = [s for s in found if s["name"] == "hetbatch.predict"]
    assert sorted(tuple(link) for s in predicts for link in s["links"]) == sorted(submitted)
    assert all(s["pid"] == workers[0].proc.pid for s in found)
    # The ensemble: its submit span reaches the member tasks' batches and the fusion task.
    member_batches = [s for s in found_later if s["name"] == "hetbatch.batch" and mean_link in s["links"]]
    assert len(member_batches) == 2  # one task per member
    (fuse,) = [s for s in found_later if s["name"] == "hetbatch.fuse"]
    assert fuse["links"] == [mean_link]
    (fuse_store,) = [s for s in found_later if s["parent"] == fuse["span_id"]]
    assert fuse_store["name"] == "hetbatch.store"
