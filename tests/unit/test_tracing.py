"""producers.protocol.tracing: off, it imports nothing and yields no context; on, a
batch span links the submit spans of the jobs it merged and writes are its children."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hetbatch.producers.protocol import tracing


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
