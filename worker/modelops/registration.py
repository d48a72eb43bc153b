"""Turn a model directory (artifact + ``model.toml``) into a registry entry.

The artifact is loaded once, on the CPU, to read what the framework knows about its
inputs and outputs; the config may state them instead, and must where the model
leaves a size open.

A minimal ``model.toml``::

    name = "iris-forest"
    framework = "sklearn"        # sklearn | onnx | torch | tensorflow
    artifact = "model.skops"     # relative to the directory
    device = "cpu"               # cpu | gpu
    # sha256 = "..."             # pin: required for pickle-based artifacts
    # max_batch_rows = 8192, max_delay_ms = 2, nan = "reject" (default; or "pass"), fallback = "cpu"
    [options]                    # framework-specific
    methods = ["predict", "predict_proba"]
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from hetbatch.adapters import Adapter, adapter_class, sha256_of
from hetbatch.producers.errors import ConfigError
from hetbatch.producers.protocol.registry import ModelSpec, Registry, Spec
from hetbatch.producers.protocol.schema import TensorSpec
from hetbatch.worker.modelops.config import CONFIG_NAME, read_config, write_config
from hetbatch.worker.modelops.ensemble_config import build_ensemble
from hetbatch.worker.models import output_row_bytes

__all__ = ["CONFIG_NAME", "build_spec", "read_config", "register_path", "write_config"]


def _inputs(config: dict[str, Any], adapter: Adapter, name: str) -> tuple[TensorSpec, ...]:
    found, _ = adapter.describe()
    if config.get("inputs"):
        try:
            declared = tuple(TensorSpec.from_dict(t) for t in config["inputs"])
        except (ValueError, KeyError) as exc:
            raise ConfigError(f"model {name!r}: [[inputs]]: {exc}") from exc
        # The worker hands the model its inputs by these names (and a ragged input's
        # lengths and mask by theirs): a typo would fail every job.
        given = [t.name for t in declared] + [c for t in declared for c in (t.lengths, t.mask) if c]
        if sorted(given) != sorted(i.name for i in found):
            raise ConfigError(
                f"model {name!r}: [[inputs]] names {given} (with lengths and masks), the model takes "
                f"{[i.name for i in found]}; rename them (or set options.input_names where the framework allows)"
            )
        return declared
    specs = []
    columns = getattr(adapter, "feature_names", lambda: None)()
    for info in found:
        if any(d is None for d in info.shape):
            raise ConfigError(
                f"model {name!r}: input {info.name!r} has open sizes {info.shape}; state its shape under [[inputs]]"
            )
        shape = tuple(int(d) for d in info.shape if d is not None)
        cols = tuple(columns) if columns and len(found) == 1 and len(columns) == (shape[0] if shape else 1) else None
        specs.append(TensorSpec(info.name, info.dtype, shape, cols))
    return tuple(specs)


def build_spec(path: str | Path, **overrides: Any) -> ModelSpec:
    """Load the model at ``path`` and describe it as a registry entry (not yet stored).

    Raises:
        ConfigError: invalid config, pinned hash mismatch, or open input sizes.
        ModelLoadError, UnsafeArtifact, MissingFramework: the artifact cannot be loaded.
    """
    config, base = read_config(path)
    config.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("name", "framework", "artifact"):
        if key not in config:
            raise ConfigError(f"{base / CONFIG_NAME}: '{key}' is required")
    artifact = (base / config["artifact"]).resolve()
    if not artifact.exists():
        raise ConfigError(f"artifact {artifact} does not exist")
    actual = sha256_of(artifact)
    pinned = config.get("sha256")
    if pinned is not None and pinned != actual:
        raise ConfigError(f"artifact {artifact} has sha256 {actual}, but the config pins {pinned}")
    options = dict(config.get("options", {}))
    adapter = adapter_class(config["framework"])(
        artifact, options=options, device="cpu", sha256=actual, pinned=pinned is not None
    ).load()
    try:
        inputs = _inputs(config, adapter, config["name"])
        outputs = tuple(config.get("outputs") or [o.name for o in adapter.describe()[1]])
        classes = config.get("classes") or adapter.classes()
        spec = _spec(config, artifact, actual, pinned, inputs, outputs, classes, options)
        # What one row's outputs weigh: the client cuts jobs so a chunk's result fits too.
        return replace(spec, output_bytes=output_row_bytes(adapter, spec))
    finally:
        adapter.unload()


def _spec(
    config: dict[str, Any],
    artifact: Path,
    actual: str,
    pinned: str | None,
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[str, ...],
    classes: Any,
    options: dict[str, Any],
) -> ModelSpec:
    try:
        ragged_outputs = tuple(str(o) for o in config.get("ragged_outputs") or ())
    except TypeError as exc:
        raise ConfigError(f"model {config['name']!r}: ragged_outputs must be a list of output names") from exc
    return ModelSpec(
        ragged_outputs=ragged_outputs,
        name=str(config["name"]),
        framework=str(config["framework"]),
        artifact=str(artifact),
        sha256=actual,
        inputs=inputs,
        outputs=outputs,
        version=str(config.get("version", "")),
        device=str(config.get("device", "cpu")),
        pinned=pinned is not None,
        max_batch_rows=config.get("max_batch_rows"),
        max_delay_ms=config.get("max_delay_ms"),
        nan=str(config.get("nan", "reject")),
        fallback=config.get("fallback"),
        classes=tuple(classes) if classes is not None else None,
        options=options,
    )


def register_path(registry: Registry, path: str | Path, **overrides: Any) -> Spec:
    """Build and store the registry entry of a model directory, or of an ensemble's
    (``kind = "ensemble"``: validated against the registry, see worker/ensemble_config.py).

    Raises:
        ConfigError: invalid config; ModelLoadError and friends: the artifact cannot be loaded.
    """
    if read_config(path, known=None)[0].get("kind") == "ensemble":
        return registry.register(build_ensemble(path, registry, **overrides))
    return registry.register(build_spec(path, **overrides))
