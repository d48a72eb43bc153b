"""``model.toml``: read and write a model directory's config (one owner for its keys and format)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomllib

from hetbatch.producers.errors import ConfigError

__all__ = ["CONFIG_NAME", "read_config", "write_config"]

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
    "ragged_outputs",
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
