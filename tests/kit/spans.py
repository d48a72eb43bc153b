"""Spans from another process, for tests: a span exporter that appends JSON lines to a file.

A worker runs in its own process, so the SDK's in-memory exporter cannot be read from
the test. With ``HETBATCH_TEST_SPANS=<file>`` in its environment and ``SITE`` on its
``PYTHONPATH`` (whose ``sitecustomize`` calls ``install``, the way ``opentelemetry-instrument``
sets up a process), the worker's global tracer provider writes every finished span to
that file at once; ``read`` gives them back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ENV = "HETBATCH_TEST_SPANS"
SITE = Path(__file__).resolve().parent / "otel_site"


def record(span: Any) -> dict[str, Any]:
    """A finished SDK span as plain JSON: ids in hex, its parent's span id, its links."""
    ctx = span.context
    return {
        "name": span.name,
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent": f"{span.parent.span_id:016x}" if span.parent is not None else None,
        "links": [[f"{link.context.trace_id:032x}", f"{link.context.span_id:016x}"] for link in span.links],
        "attributes": dict(span.attributes or {}),
        "pid": os.getpid(),
    }


def install() -> None:
    """Set this process's global tracer provider to one that writes to ``$HETBATCH_TEST_SPANS``
    (nothing without the variable)."""
    found = os.environ.get(ENV)
    if not found:
        return
    path = found
    from opentelemetry import trace
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    class JsonLines(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            text = "".join(json.dumps(record(s)) + "\n" for s in spans)
            with open(path, "a") as fh:  # one write per batch of spans: lines never interleave
                fh.write(text)
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLines()))
    trace.set_tracer_provider(provider)


def read(path: Path) -> list[dict[str, Any]]:
    """The spans written to ``path`` so far."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
