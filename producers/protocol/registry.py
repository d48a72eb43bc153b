"""The model registry, kept in Redis and read by producers and workers alike.

Layout: hash ``<prefix>:models`` maps a name to its latest version; hash
``<prefix>:model:<name>`` maps each version to the entry's JSON. A version, once
registered, never changes, so a worker may cache ``name@version`` forever; ``name``
alone resolves to the latest version at submit time, which is how workers pick up a
new version without a restart.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, TypeAlias, TypeVar

import redis

from hetbatch.producers.errors import ConfigError, ModelNotFound
from hetbatch.producers.protocol.ensemble import EnsembleSpec
from hetbatch.producers.protocol.keys import Keys
from hetbatch.producers.protocol.model import ModelSpec, parse_ref

__all__ = ["ModelSpec", "Registry", "Spec", "as_model", "parse_ref"]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


Spec: TypeAlias = ModelSpec | EnsembleSpec
"""A registry entry: a model or an ensemble of registered models."""
_DECODERS: dict[str, Callable[[Mapping[str, Any]], Spec]] = {
    "model": ModelSpec.from_dict,
    "ensemble": EnsembleSpec.from_dict,
}
S = TypeVar("S", ModelSpec, EnsembleSpec)


def as_model(spec: Spec) -> ModelSpec:
    """``spec`` when it is a model.

    Raises:
        ConfigError: it is an ensemble (its members are the models).
    """
    if not isinstance(spec, ModelSpec):
        members = ", ".join(m.ref for m in spec.members)
        raise ConfigError(f"{spec.ref} is an ensemble, not a model: name one of its members ({members})")
    return spec


class Registry:
    """Read and write registry entries in Redis."""

    def __init__(self, client: redis.Redis, keys: Keys | None = None) -> None:
        self._redis = client
        self._keys = keys or Keys()

    def register(self, spec: S) -> S:
        """Store ``spec`` (assigning the next version when its version is empty).

        Raises:
            ConfigError: that version exists already with a different artifact.
        """
        key = self._keys.model(spec.name)
        version = spec.version or str(self._redis.incr(self._keys.model_seq(spec.name)))
        spec = replace(spec, version=version, created=spec.created or time.time())
        body = json.dumps(spec.to_dict(), sort_keys=True)
        if not self._redis.hsetnx(key, version, body):
            old = json.loads(self._redis.hget(key, version) or b"{}")
            if old.get("sha256") != getattr(spec, "sha256", None) or old.get("kind") != spec.kind:
                raise ConfigError(
                    f"{spec.name}@{version} is registered already with other contents; "
                    "versions are immutable: register a new version"
                )
            stored = self._decode(old)
            if not isinstance(stored, type(spec)):  # the kinds were compared above
                raise ConfigError(f"{spec.name}@{version} is registered already as another kind of entry")
            return stored
        self._redis.hset(self._keys.models(), spec.name, version)
        return spec

    def get(self, ref: str) -> Spec:
        """Resolve ``name`` (latest) or ``name@version``.

        Raises:
            ModelNotFound: no such name or version.
        """
        name, version = parse_ref(ref)
        if version is None:
            raw_version = self._redis.hget(self._keys.models(), name)
            if raw_version is None:
                raise ModelNotFound(ref, self.names())
            version = _text(raw_version)
        body = self._redis.hget(self._keys.model(name), version)
        if body is None:
            raise ModelNotFound(ref, [f"{name}@{v}" for v in self.versions(name)] or self.names())
        return self._decode(json.loads(body))

    def model(self, ref: str) -> ModelSpec:
        """``get`` for a model.

        Raises:
            ModelNotFound: no such name or version.
            ConfigError: ``ref`` names an ensemble.
        """
        return as_model(self.get(ref))

    def names(self) -> list[str]:
        return sorted(_text(k) for k in self._redis.hkeys(self._keys.models()))

    def versions(self, name: str) -> list[str]:
        found = [_text(k) for k in self._redis.hkeys(self._keys.model(name))]
        return sorted(found, key=lambda v: (len(v), v))

    def list(self) -> list[Spec]:
        """The latest version of every entry, by name."""
        return [self.get(name) for name in self.names()]

    def delete(self, name: str) -> None:
        """Forget a name and all its versions."""
        key = self._keys.model(name)
        self._redis.delete(key, self._keys.model_seq(name))
        self._redis.hdel(self._keys.models(), name)

    @staticmethod
    def _decode(data: Mapping[str, Any]) -> Spec:
        kind = str(data.get("kind", "model"))
        if kind not in _DECODERS:
            raise ConfigError(f"registry entry of unknown kind {kind!r}; upgrade hetbatch on this side")
        return _DECODERS[kind](data)
