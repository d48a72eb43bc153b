"""OpenTelemetry traces, optional and off by default: the one module that touches it.

Off (the default), every function here returns at once and ``opentelemetry`` is never
imported: tracing costs a boolean test per call. ``configure(True)`` (a producer's or a
worker's ``tracing`` setting, ``HETBATCH_TRACING=1``; needs the ``otel`` extra) turns
it on; spans go to the process's global tracer provider, which the application sets
up with its exporter as usual.

- ``submit_span``: a producer's submit; its W3C ``traceparent`` travels in the task
  envelope (field ``trace``).
- ``batch_span``: a worker's model call over the rows of several jobs, with one link to
  the submit span of each job it merged (a batch has many parents, so links, not a parent).
- ``child_span``: fusion and result writes, under the current span.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from hetbatch.producers.errors import ConfigError

__all__ = ["batch_span", "child_span", "configure", "enabled", "is_traceparent", "submit_span"]

TRACER = "hetbatch"
_TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_on = False


def configure(on: bool) -> None:
    """Turn tracing on or off for this process.

    Raises:
        ConfigError: ``on`` without the ``otel`` extra (``pip install 'hetbatch[otel]'``).
    """
    global _on
    if on:
        try:
            import opentelemetry.trace  # noqa: F401 - fail at start, not at the first job
        except ImportError as exc:  # typed: a CLI prints it as one line, a service can catch it
            raise ConfigError(
                f"tracing is on (HETBATCH_TRACING or tracing=True) but OpenTelemetry does not import ({exc}); "
                "pip install 'hetbatch[otel]', or turn tracing off"
            ) from exc
    _on = on


def enabled() -> bool:
    """Whether this process records spans."""
    return _on


def is_traceparent(value: object) -> bool:
    """Whether ``value`` is a W3C ``traceparent`` of version 00 (what the envelope accepts)."""
    return isinstance(value, str) and _TRACEPARENT.fullmatch(value) is not None


def _tracer() -> Any:
    from opentelemetry import trace

    return trace.get_tracer(TRACER)


@contextmanager
def submit_span(name: str, attributes: dict[str, str | int] | None = None) -> Iterator[str | None]:
    """A span around a producer's submit; yields its ``traceparent`` for the envelope
    (None when tracing is off)."""
    if not _on:
        yield None
        return
    from opentelemetry.propagate import inject

    with _tracer().start_as_current_span(name, attributes=attributes or {}):
        carrier: dict[str, str] = {}
        inject(carrier)
        yield carrier.get("traceparent")


def _context(traceparent: str) -> Any:
    """The span context a ``traceparent`` names (None when it does not parse)."""
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    ctx = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
    span_context = trace.get_current_span(ctx).get_span_context()
    return span_context if span_context.is_valid else None


@contextmanager
def batch_span(
    name: str, parents: Iterable[str | None], attributes: dict[str, str | int] | None = None
) -> Iterator[None]:
    """A span around one batch, linked to the submit span of each job in it (jobs
    without a ``traceparent`` add no link)."""
    if not _on:
        yield
        return
    from opentelemetry.trace import Link

    contexts = {tp: _context(tp) for tp in set(parents) if tp is not None and is_traceparent(tp)}
    links = [Link(c) for c in contexts.values() if c is not None]
    with _tracer().start_as_current_span(name, links=links, attributes=attributes or {}):
        yield


@contextmanager
def child_span(name: str, attributes: dict[str, str | int] | None = None) -> Iterator[None]:
    """A span under the current one (fusion, result writes)."""
    if not _on:
        yield
        return
    with _tracer().start_as_current_span(name, attributes=attributes or {}):
        yield
