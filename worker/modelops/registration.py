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
    # max_batch_rows = 8192, max_delay_ms = 2, nan = "reject", fallback = "cpu"
    [options]                    # framework-specific
    methods = ["predict", "predict_proba"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomllib

from hetbatch.adapters import Adapter, adapter_class, sha256_of
from hetbatch.producers.errors import ConfigError
from hetbatch.producers.protocol.registry import ModelSpec, Registry, Spec
from hetbatch.producers.protocol.schema import TensorSpec

__all__ = ["CONFIG_NAME", "build_spec", "read_config", "register_path", "write_config"]

CONFIG_NAME = "model.toml"
_KEYS = {
    "name",
    "framework",
    "artifact",
    "device",
    "sha256",
    "version",
    "max_batch_rows",
    "max_delay_ms",
    "nan",
    "fallback",
    "classes",
    "options",
    "inputs",
    "outputs",
    "kind",
}


def read_config(path: str | Path, known: set[str] | None = _KEYS) -> tuple[dict[str, Any], Path]:
    """Read ``model.toml`` from a directory (or the file itself); returns (config, directory).

    ``known`` are the keys allowed (None: any; ensembles have their own set).

    Raises:
        ConfigError: missing or unparsable file, or unknown keys.
    """
    path = Path(path)
    file = path / CONFIG_NAME if path.is_dir() else path
    try:
        config = tomllib.loads(file.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"no {CONFIG_NAME} in {path}; see 'hetbatch models register --help'") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: {exc}") from exc
    unknown = sorted(set(config) - set(known)) if known is not None else []
    if unknown:
        raise ConfigError(f"{file}: unknown keys {unknown}; known: {sorted(known or ())}")
    return config, file.parent


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, (int, float)):
        return repr(value)
    raise ConfigError(f"cannot write {type(value).__name__} to {CONFIG_NAME}")


def write_config(directory: str | Path, **config: Any) -> Path:
    """Write a ``model.toml``: flat keys, an ``options`` table, ``inputs`` tables.

    Returns the directory, ready for ``build_spec``.
    """
    directory = Path(directory)
    options = dict(config.pop("options", {}) or {})
    inputs = list(config.pop("inputs", []) or [])
    lines = [f"{k} = {_toml_value(v)}" for k, v in config.items() if v is not None]
    if options:
        lines.append("[options]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in options.items()]
    for spec in inputs:
        lines.append("[[inputs]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in spec.items()]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text("\n".join(lines) + "\n")
    return directory


def _inputs(config: dict[str, Any], adapter: Adapter, name: str) -> tuple[TensorSpec, ...]:
    found, _ = adapter.describe()
    if config.get("inputs"):
        declared = tuple(TensorSpec.from_dict(t) for t in config["inputs"])
        # The worker hands the model its inputs by these names: a typo would fail every job.
        if sorted(t.name for t in declared) != sorted(i.name for i in found):
            raise ConfigError(
                f"model {name!r}: [[inputs]] names {[t.name for t in declared]}, the model takes "
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
    finally:
        adapter.unload()
    return ModelSpec(
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
        nan=str(config.get("nan", "pass")),
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
        from hetbatch.worker.modelops.ensemble_config import build_ensemble

        return registry.register(build_ensemble(path, registry, **overrides))
    return registry.register(build_spec(path, **overrides))
