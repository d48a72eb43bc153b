"""Per-process cache of loaded models and their batchers, loaded lazily by name@version."""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from hetbatch.adapters import Adapter, AdapterError, ModelLoadError, adapter_class
from hetbatch.adapters.base import TensorInfo, sample_inputs
from hetbatch.producers.protocol.registry import ModelSpec, Registry
from hetbatch.worker.batching import Arrivals, Batcher, BatchStats
from hetbatch.worker.pool import DEVICE_FAILED_EXIT
from hetbatch.worker.ragged import RaggedCall, is_ragged, padded_bytes, sample_rows
from hetbatch.worker.settings import WorkerSettings

__all__ = ["LoadedModel", "ModelCache", "output_row_bytes", "warm_up_ragged"]

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    spec: ModelSpec
    adapter: Adapter
    batcher: Batcher
    load_s: float


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


def warm_up_ragged(adapter: Adapter, spec: ModelSpec) -> dict[str, np.ndarray]:
    """Call a ragged model once on two short rows of zeros, padded as every call will be;
    returns the outputs.

    Raises:
        ModelLoadError: the call failed.
    """
    call = RaggedCall(adapter.predict, spec, max_rows=2, max_bytes=1 << 30)
    try:
        return call(sample_rows(spec))
    except AdapterError as exc:
        raise ModelLoadError(f"{spec.name}: its first call (two padded rows of zeros) failed: {exc}") from exc


def output_row_bytes(adapter: Adapter, spec: ModelSpec) -> int:
    """Bytes of one row of the model's fixed-size outputs, from a call on two rows of
    zeros (0 when that call fails, e.g. for inputs that zeros do not fit). The client
    cuts a job so that a chunk's result stays within its byte budget too."""
    try:
        if is_ragged(spec):
            got = warm_up_ragged(adapter, spec)
        else:
            got = adapter.predict(sample_rows(spec))
    except Exception as exc:  # any failure only leaves the estimate out
        log.info("%s: output size not measured (%s)", spec.name, exc)
        return 0
    names = [n for n in spec.outputs if n in got] or list(got)
    sizes = [got[n].nbytes // max(1, len(got[n])) for n in names if got[n].dtype.kind not in "OUS"]
    return int(sum(sizes))


def _cores() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _exit_on_device_failure(exc: BaseException) -> None:
    """A sticky CUDA error poisoned this process's context: every later call would fail.
    Exit without answering, so the unacknowledged jobs go to another worker (the attempt
    cap stops a job that kills every worker it reaches)."""
    log.critical("device failed (%s); exiting with status %d so the jobs are redelivered", exc, DEVICE_FAILED_EXIT)
    logging.shutdown()
    os._exit(DEVICE_FAILED_EXIT)


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
            spec = self._registry.model(ref)
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
        ragged = is_ragged(spec)
        if not ragged:  # a byte budget too: 8,192 rows of 600 KB images would be 4.9 GB in one call
            max_rows = min(max_rows, max(1, settings.max_batch_bytes // padded_bytes(spec, 1)))
        # What the framework allows is the adapter's to say (adapters/options.py Capabilities).
        caps = adapter_class(spec.framework).capabilities(spec.artifact)
        # Single-threaded calls: one instance per core. The others use every core in one
        # call unless calibration shows one thread per call gives the same bits.
        instances = int(options.get("instances") or settings.instances) or (_cores() if caps.instance_per_core else 1)
        explicit = {"instances", "threads"} & set(spec.options) or settings.instances or settings.intra_op_threads
        # A row-coupled model (dynamic quantization) gives a job's rows the answer it gives
        # them in one call of their own only: one call per request, never merged or cut.
        coupled = caps.couples_rows
        if coupled:
            instances, max_rows = 1, _UNCUT
        tune = caps.calibrated_threads and device == "cpu" and not explicit and _cores() > 1 and not coupled
        tune = tune and not ragged  # the probe batch has fixed shapes
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
        predict: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]] = adapter.predict
        padded: Callable[[], float | None] | None = None
        if ragged:
            # The batcher gathers what is waiting (at least the worker's rows per call); the
            # ragged call cuts it by length into calls of max_rows rows and max_batch_bytes.
            call = RaggedCall(adapter.predict, spec, max_rows=max_rows, max_bytes=settings.max_batch_bytes)
            predict, padded = call, call.take_padded_fraction
            max_rows = max(max_rows, settings.max_batch_rows)
        batcher = Batcher(
            predict,
            max_batch_rows=max_rows,
            max_delay_ms=spec.max_delay_ms if spec.max_delay_ms is not None else self._settings.max_delay_ms,
            name=spec.ref,
            on_batch=(lambda stats: on_batch(spec, stats)) if on_batch else None,
            incoming=(lambda: arrivals.count(spec.ref)) if arrivals is not None else None,
            instances=instances if device == "cpu" else 1,
            merge=not coupled,
            padded=padded,
            on_fatal=_exit_on_device_failure,
        )
        return LoadedModel(spec, adapter, batcher, load_s)

    @staticmethod
    def _adapter(spec: ModelSpec, options: dict[str, object], device: str) -> Adapter:
        """The loaded adapter, called once on a tiny batch of the entry's inputs.

        Raises:
            ModelLoadError: the load or the warm-up call failed (e.g. a graph that cannot
                run on this device): one error at load, not a failed job per request.
        """
        adapter = adapter_class(spec.framework)(
            spec.artifact, options=options, device=device, sha256=spec.sha256, pinned=spec.pinned
        ).load()
        try:
            if is_ragged(spec):  # padded by the ragged call, as every later call will be
                warm_up_ragged(adapter, spec)
            else:
                adapter.warm_up([TensorInfo(t.name, t.dtype, t.shape) for t in spec.inputs])
        except Exception:
            adapter.unload()
            raise
        return adapter

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
