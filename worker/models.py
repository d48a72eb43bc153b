"""Per-process cache of loaded models and their batchers, loaded lazily by name@version."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from adapters import Adapter, ModelLoadError, adapter_class
from producers.registry import ModelSpec, Registry
from worker.batching import Arrivals, Batcher, BatchStats
from worker.settings import WorkerSettings

__all__ = ["LoadedModel", "ModelCache"]

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    spec: ModelSpec
    adapter: Adapter
    batcher: Batcher
    load_s: float


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
        return loaded

    def _load(self, spec: ModelSpec) -> LoadedModel:
        started = time.monotonic()
        options = dict(spec.options)
        # scikit-learn calls are single-threaded: one instance per core. The others use every
        # core in one call; one thread per call would change their sums' order, so their
        # outputs would no longer equal the in-process ones bit for bit.
        instances = int(options.pop("instances", self._settings.instances)) or (
            _cores() if spec.framework == "sklearn" else 1
        )
        # Several instances share the cores: one thread per call unless told otherwise.
        options.setdefault("threads", self._settings.intra_op_threads or (1 if instances > 1 else 0))
        if spec.device == "gpu" and self._settings.pool != "gpu" and spec.fallback != "cpu":
            raise ModelLoadError(
                f"{spec.ref} is a gpu model without fallback = 'cpu': a cpu worker does not run it; "
                f"start a gpu worker for queue {spec.queue}"
            )
        device = "gpu" if spec.device == "gpu" and self._settings.pool == "gpu" else "cpu"
        adapter = adapter_class(spec.framework)(
            spec.artifact, options=options, device=device, sha256=spec.sha256, pinned=spec.pinned
        ).load()
        load_s = time.monotonic() - started
        log.info("loaded %s (%s on %s) in %.2f s", spec.ref, spec.framework, device, load_s)
        on_batch, arrivals = self._on_batch, self._arrivals
        batcher = Batcher(
            adapter.predict,
            max_batch_rows=spec.max_batch_rows or self._settings.max_batch_rows,
            max_delay_ms=spec.max_delay_ms if spec.max_delay_ms is not None else self._settings.max_delay_ms,
            name=spec.ref,
            on_batch=(lambda stats: on_batch(spec, stats)) if on_batch else None,
            incoming=(lambda: arrivals.count(spec.ref)) if arrivals is not None else None,
            instances=instances if device == "cpu" else 1,
        )
        return LoadedModel(spec, adapter, batcher, load_s)

    def loaded(self) -> list[LoadedModel]:
        return list(self._models.values())

    def close(self) -> None:
        for model in self._models.values():
            model.batcher.close()
            model.adapter.unload()
        self._models.clear()
