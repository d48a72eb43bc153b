"""Per-process cache of loaded models and their batchers, loaded lazily by name@version."""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from hetbatch.adapters import Adapter, ModelLoadError, adapter_class
from hetbatch.adapters.base import TensorInfo
from hetbatch.adapters.offline.parity import sample_inputs
from hetbatch.adapters.onnx import couples_rows
from hetbatch.producers.protocol.registry import ModelSpec, Registry
from hetbatch.worker.batching import Arrivals, Batcher, BatchStats
from hetbatch.worker.settings import WorkerSettings

__all__ = ["LoadedModel", "ModelCache"]

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    spec: ModelSpec
    adapter: Adapter
    batcher: Batcher
    load_s: float


# Frameworks whose sessions take a per-session thread count (torch's is process-wide).
_CALIBRATED = frozenset({"onnx"})
_PROBE_ROWS = 8192
_UNCUT = 1 << 40  # "no limit" on rows per call
_PROBE_MIN_ROWS = 16
_PROBE_S = 0.05
_CALL_ROWS = (512, 1024, 2048, 4096, 8192)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")


def _fastest_rows(adapter: Adapter, probe: dict[str, np.ndarray], max_rows: int) -> int:
    """The call size (of _CALL_ROWS, at most ``max_rows``) with the least time per row.

    The session is single-threaded, so its calls run on this thread: this thread's CPU
    time measures them without the time other processes held the core."""
    rows = len(next(iter(probe.values())))
    sizes = [r for r in _CALL_ROWS if r <= min(max_rows, rows)] or [max_rows]
    best: dict[int, float] = {}
    for _ in range(3):
        for size in sizes:
            started = time.thread_time()
            for start in range(0, rows, size):
                adapter.predict({n: a[start : start + size] for n, a in probe.items()})
            elapsed = time.thread_time() - started
            best[size] = min(best.get(size, elapsed), elapsed)
    return min(best, key=lambda size: best[size])


def _cores() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


class ModelCache:
    """Loads each ``name@version`` once per process; versions are immutable, so entries
    never go stale. Concurrent first requests wait for one load."""

    def __init__(
        self,
        registry: Registry,
        settings: WorkerSettings,
        on_batch: Callable[[ModelSpec, BatchStats], None] | None = None,
        arrivals: Arrivals | None = None,
    ) -> None:
        self._registry = registry
        self._settings = settings
        self._on_batch = on_batch
        self._arrivals = arrivals
        self._specs: dict[str, ModelSpec] = {}
        self._models: dict[str, LoadedModel] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def spec(self, ref: str) -> ModelSpec:
        """Registry entry for an exact ``name@version`` (cached).

        Raises:
            ModelNotFound: not registered.
        """
        spec = self._specs.get(ref)
        if spec is None:
            spec = self._registry.get(ref)
            self._specs[ref] = spec
        return spec

    def get(self, spec: ModelSpec) -> LoadedModel:
        """The loaded model for ``spec``, loading it on first use.

        Raises:
            ModelLoadError, UnsafeArtifact, MissingFramework: the load failed (not cached,
                so a fixed artifact is picked up by the next job).
        """
        loaded = self._models.get(spec.ref)
        if loaded is not None:
            return loaded
        with self._guard:
            lock = self._locks.setdefault(spec.ref, threading.Lock())
        with lock:
            loaded = self._models.get(spec.ref)
            if loaded is None:
                loaded = self._load(spec)
                self._models[spec.ref] = loaded
                gc.freeze()  # the model's objects stay loaded: keep full collections off them
        return loaded

    def _load(self, spec: ModelSpec) -> LoadedModel:
        started, settings = time.monotonic(), self._settings
        options = dict(spec.options)
        if spec.device == "gpu" and settings.pool != "gpu" and spec.fallback != "cpu":
            raise ModelLoadError(
                f"{spec.ref} is a gpu model without fallback = 'cpu': a cpu worker does not run it; "
                f"start a gpu worker for queue {spec.queue}"
            )
        device = "gpu" if spec.device == "gpu" and settings.pool == "gpu" else "cpu"
        max_rows = spec.max_batch_rows or settings.max_batch_rows
        # scikit-learn calls are single-threaded: one instance per core. The others use every
        # core in one call unless calibration shows one thread per call gives the same bits.
        instances = int(options.pop("instances", settings.instances)) or (
            _cores() if spec.framework == "sklearn" else 1
        )
        explicit = {"instances", "threads"} & set(spec.options) or settings.instances or settings.intra_op_threads
        # A row-coupled model (dynamic quantization) gives a job's rows the answer it gives
        # them in one call of their own only: one call per request, never merged or cut.
        coupled = spec.framework == "onnx" and couples_rows(spec.artifact)
        if coupled:
            instances, max_rows = 1, _UNCUT
        tune = spec.framework in _CALIBRATED and device == "cpu" and not explicit and _cores() > 1 and not coupled
        if tune:
            adapter, instances, max_rows = self._calibrate(spec, options, max_rows, size=not spec.max_batch_rows)
        else:
            # Several instances share the cores: one thread per call unless told otherwise.
            options.setdefault("threads", settings.intra_op_threads or (1 if instances > 1 else 0))
            adapter = self._adapter(spec, options, device)
        load_s = time.monotonic() - started
        log.info(
            "loaded %s (%s on %s) in %.2f s: %d instance(s), at most %d rows per call",
            *(spec.ref, spec.framework, device, load_s, instances, max_rows),
        )
        on_batch, arrivals = self._on_batch, self._arrivals
        batcher = Batcher(
            adapter.predict,
            max_batch_rows=max_rows,
            max_delay_ms=spec.max_delay_ms if spec.max_delay_ms is not None else self._settings.max_delay_ms,
            name=spec.ref,
            on_batch=(lambda stats: on_batch(spec, stats)) if on_batch else None,
            incoming=(lambda: arrivals.count(spec.ref)) if arrivals is not None else None,
            instances=instances if device == "cpu" else 1,
            merge=not coupled,
        )
        return LoadedModel(spec, adapter, batcher, load_s)

    @staticmethod
    def _adapter(spec: ModelSpec, options: dict[str, object], device: str) -> Adapter:
        return adapter_class(spec.framework)(
            spec.artifact, options=options, device=device, sha256=spec.sha256, pinned=spec.pinned
        ).load()

    def _calibrate(
        self, spec: ModelSpec, options: dict[str, object], max_rows: int, *, size: bool
    ) -> tuple[Adapter, int, int]:
        """(adapter, instances, rows per call) for a cpu model whose entry leaves them open.

        One single-threaded instance per core beats one call over every core when other
        work shares the cores (a straggling thread stalls the whole call), but only where
        it gives the same bits: both sessions score one probe batch, and any difference
        keeps the multi-threaded one. With ``size``, the rows per call are the probe size
        that ran fastest per row (smaller calls keep activations in cache)."""
        shared = self._adapter(spec, {**options, "threads": 0}, "cpu")
        single = self._adapter(spec, {**options, "threads": 1}, "cpu")
        try:
            # The registry's shapes: the artifact may leave sizes open that the entry pins.
            inputs = [TensorInfo(t.name, t.dtype, t.shape) for t in spec.inputs]
            probe = sample_inputs(inputs, rows=_PROBE_MIN_ROWS)
            single.predict(probe)  # the first call allocates: not timed
            started = time.thread_time()
            single.predict(probe)
            per_row = (time.thread_time() - started) / _PROBE_MIN_ROWS
            # A probe of about _PROBE_S per pass: 8192 rows of a small MLP, a few of a big CNN.
            rows = int(min(max_rows, _PROBE_ROWS, max(_PROBE_MIN_ROWS, _PROBE_S / max(per_row, 1e-9))))
            probe = sample_inputs(inputs, rows=rows)
            want, got = shared.predict(probe), single.predict(probe)
        except Exception as exc:  # open sizes, strings, values out of an embedding's range...
            log.info("%s: no calibration (the probe batch failed: %s); one call uses every core", spec.ref, exc)
            single.unload()
            return shared, 1, max_rows
        same = want.keys() == got.keys() and all(_same_bits(want[n], got[n]) for n in want)
        keep, drop = (single, shared) if same else (shared, single)
        drop.unload()
        if not same:
            log.info("%s: one thread per call changes its outputs; one call uses every core", spec.ref)
            return keep, 1, max_rows
        if size and rows >= _CALL_ROWS[0]:
            max_rows = _fastest_rows(keep, probe, max_rows)
        return keep, _cores(), max_rows

    def loaded(self) -> list[LoadedModel]:
        return list(self._models.values())

    def close(self) -> None:
        for model in self._models.values():
            model.batcher.close()
            model.adapter.unload()
        self._models.clear()
