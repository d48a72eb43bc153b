"""producers.protocol.tracing: off, it imports nothing and yields no context; on, a
batch span links the submit spans of the jobs it merged and writes are its children."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from typing import Any

import pytest
import redis

from hetbatch.producers.errors import PayloadError
from hetbatch.producers.protocol import tracing
from hetbatch.producers.protocol.ensemble import Continuation
from hetbatch.producers.protocol.keys import Keys, lane_list
from hetbatch.producers.protocol.kombu import frame_envelope
from hetbatch.producers.protocol.ledger import Ledger
from hetbatch.producers.protocol.transport import Transport
from hetbatch.producers.protocol.wire import TaskEnvelope
from hetbatch.producers.publisher import Publisher


def test_off_imports_no_opentelemetry() -> None:
    # redis-py imports opentelemetry by itself when installed (redis.observability):
    # what must not happen is an import by the calls, off.
    code = (
        "import sys\n"
        "from hetbatch.producers.protocol import tracing as t\n"
        "before = set(sys.modules)\n"
        "with t.submit_span('submit') as tp: assert tp is None\n"
        "with t.batch_span('batch', [None]), t.child_span('write'): pass\n"
        "assert not [m for m in set(sys.modules) - before if m.startswith('opentelemetry')], 'imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_batch_span_links_every_submit_span_and_writes_are_children() -> None:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer(tracing.TRACER)
    tracing.configure(True)
    try:
        # The global provider can be set once per process: patch the module's tracer.
        original = tracing._tracer
        tracing._tracer = lambda: tracer  # type: ignore[assignment]
        parents = []
        for n in range(3):
            with tracing.submit_span("hetbatch.submit", {"job": n}) as tp:
                assert tracing.is_traceparent(tp)
                parents.append(tp)
        # The store span is entered inside the batch span: its child.
        with (
            tracing.batch_span("hetbatch.batch", [*parents, None, parents[0], "junk"]),
            tracing.child_span("hetbatch.store"),
        ):
            pass
    finally:
        tracing._tracer = original  # type: ignore[assignment]
        tracing.configure(False)
    spans = {s.name: s for s in exporter.get_finished_spans() if s.name != "hetbatch.submit"}
    submits = [s for s in exporter.get_finished_spans() if s.name == "hetbatch.submit"]
    batch, store = spans["hetbatch.batch"], spans["hetbatch.store"]
    linked = {(link.context.trace_id, link.context.span_id) for link in batch.links}
    assert linked == {(s.context.trace_id, s.context.span_id) for s in submits}
    assert store.parent is not None and store.parent.span_id == batch.context.span_id


ENV = {"v": 1, "model": "m", "version": "1", "items": [["job-1", 0, 2]], "payload_b64": ""}


def test_the_envelope_carries_a_traceparent_and_refuses_any_other_value() -> None:
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    env = TaskEnvelope.from_dict(dict(ENV, trace=tp))
    assert env.trace == tp and env.to_dict()["trace"] == tp
    assert TaskEnvelope.from_dict(env.to_dict()) == env
    assert "trace" not in TaskEnvelope.from_dict(ENV).to_dict()  # absent: nothing on the wire
    for bad in ("junk", 7, tp.upper(), "ff" + tp[2:], tp + "-x", ["00"]):
        with pytest.raises(PayloadError, match=r"job job-1: field 'trace' must be a W3C traceparent"):
            TaskEnvelope.from_dict(dict(ENV, trace=bad))


def test_an_ensemble_continuation_carries_the_trace_on() -> None:
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    cont = Continuation("ens@1", "job-1", 0, 0, (0, 1), 2, trace=tp)
    assert Continuation.from_dict(cont.to_dict()) == cont
    assert "trace" not in replace(cont, trace=None).to_dict()  # off: the fusion body as before
    with pytest.raises(PayloadError, match="field 'trace'"):
        Continuation.from_dict(dict(cont.to_dict(), trace="junk"))


@pytest.fixture()
def spans(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Tracing on, spans kept in memory (the module's tracer patched: the global provider
    can be set once per process)."""
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_tracer", lambda: provider.get_tracer(tracing.TRACER))
    monkeypatch.setattr(tracing, "_on", False)  # restored after the test, whatever turns it on
    return exporter


def _publisher(trace_submits: bool) -> Publisher:
    client = redis.Redis()  # never connected: enqueue only records commands
    keys = Keys()
    return Publisher(
        client, keys, Ledger(client, keys), Transport(keys, "", 1 << 20),
        retries=1, input_ttl_s=60, result_ttl_s=60, trace_submits=trace_submits,
    )  # fmt: skip


def test_every_envelope_a_submit_publishes_carries_its_span(spans: Any) -> None:
    publisher = _publisher(trace_submits=True)
    assert tracing.enabled()
    with publisher.submitting({"hetbatch.job": "job-1"}) as batch:
        for n in range(2):
            env = TaskEnvelope.from_dict(dict(ENV, items=[["job-1", n, 2]]))
            publisher.enqueue(batch, "sklearn.cpu", env, 5)
            publisher.enqueue(batch, "sklearn.cpu", env, 5, lane=True)
    (submit,) = spans.get_finished_spans()
    assert submit.name == "hetbatch.submit" and submit.attributes["hetbatch.job"] == "job-1"
    ctx = submit.context
    assert batch.trace is not None and batch.trace.startswith(f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-")
    assert [env.trace for env in batch.envelopes] == [batch.trace] * 4
    # What goes to Redis: the ledger entries, the Celery messages and the lane entries.
    ledger = [kw["mapping"]["env"] for name, _, kw in batch.calls if name == "hset"]
    pushed = [args for name, args, _ in batch.calls if name == "lpush"]
    lane = [json.loads(raw) for to, raw in pushed if to == lane_list("sklearn.cpu")]
    celery = [frame_envelope(raw) for to, raw in pushed if to != lane_list("sklearn.cpu")]
    assert len(ledger) == 4 and len(celery) == 2 and len(lane) == 2
    assert all(json.loads(text)["trace"] == batch.trace for text in ledger)
    assert all(body is not None and body["trace"] == batch.trace for body in celery + lane)


def test_off_a_submit_sends_no_trace(spans: Any) -> None:
    publisher = _publisher(trace_submits=False)
    assert not tracing.enabled()
    with publisher.submitting({}) as batch:
        publisher.enqueue(batch, "sklearn.cpu", TaskEnvelope.from_dict(ENV), 5)
    assert batch.trace is None and batch.envelopes[0].trace is None
    assert not spans.get_finished_spans()
    assert not any("trace" in str(args) for _, args, _ in batch.calls)
