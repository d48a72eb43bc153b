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
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import redis

from hetbatch.producers.errors import ConfigError, ModelNotFound
from hetbatch.producers.protocol.schema import TensorSpec
from hetbatch.producers.protocol.wire import DEVICES, FRAMEWORKS, Keys, queue_for

__all__ = ["ModelSpec", "Registry", "Spec", "parse_ref"]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``"name@version"`` -> (name, version); ``"name"`` -> (name, None)."""
    name, _, version = ref.partition("@")
    if not name:
        raise ModelNotFound(ref)
    return name, version or None


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: everything a producer and a worker need to agree on.

    Attributes:
        name: registry name.
        framework: one of ``FRAMEWORKS``; picks the adapter and the queue.
        artifact: absolute path of the model file or directory, visible to workers.
        sha256: hash of the artifact, checked at every load.
        inputs: input tensors in the model's order.
        outputs: output names, one result column each.
        version: assigned at registration when empty.
        device: ``cpu`` or ``gpu``; picks the queue.
        pinned: the config pinned ``sha256`` itself; required for pickle-based artifacts.
        max_batch_rows: rows per model call (worker default when None).
        max_delay_ms: how long the batcher waits for more rows (worker default when None).
        nan: ``pass`` or ``reject`` NaN/inf in float inputs.
        fallback: ``cpu`` lets a gpu model run on the cpu pool when no gpu worker is up.
        classes: class labels in output column order, for classifiers.
        options: framework-specific settings (methods, signature, providers, ...).
    """

    name: str
    framework: str
    artifact: str
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[str, ...]
    version: str = ""
    device: str = "cpu"
    pinned: bool = False
    max_batch_rows: int | None = None
    max_delay_ms: float | None = None
    nan: str = "pass"
    fallback: str | None = None
    classes: tuple[Any, ...] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    created: float = 0.0
    kind: str = "model"

    def __post_init__(self) -> None:
        if self.framework not in FRAMEWORKS:
            raise ConfigError(f"model {self.name!r}: framework {self.framework!r} is not one of {FRAMEWORKS}")
        if self.device not in DEVICES:
            raise ConfigError(f"model {self.name!r}: device {self.device!r} is not one of {DEVICES}")
        if self.nan not in ("pass", "reject"):
            raise ConfigError(f"model {self.name!r}: nan must be 'pass' or 'reject', not {self.nan!r}")
        if self.fallback not in (None, "cpu"):
            raise ConfigError(f"model {self.name!r}: fallback may only be 'cpu'")
        if not self.inputs:
            raise ConfigError(f"model {self.name!r}: declares no inputs")

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def queue(self) -> str:
        return queue_for(self.framework, self.device)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["inputs"] = [t.to_dict() for t in self.inputs]
        out["outputs"] = list(self.outputs)
        out["classes"] = list(self.classes) if self.classes is not None else None
        out["options"] = dict(self.options)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        known = set(cls.__dataclass_fields__)
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["inputs"] = tuple(TensorSpec.from_dict(t) for t in data["inputs"])
        kwargs["outputs"] = tuple(str(o) for o in data["outputs"])
        if data.get("classes") is not None:
            kwargs["classes"] = tuple(data["classes"])
        return cls(**kwargs)


# Entry kinds the registry stores; the fusion module adds "ensemble".
Spec = Any
_DECODERS: dict[str, Callable[[Mapping[str, Any]], Spec]] = {"model": ModelSpec.from_dict}


def register_kind(kind: str, decoder: Callable[[Mapping[str, Any]], Spec]) -> None:
    """Teach the registry to decode another kind of entry (e.g. ensembles)."""
    _DECODERS[kind] = decoder


class Registry:
    """Read and write registry entries in Redis."""

    def __init__(self, client: redis.Redis, keys: Keys | None = None) -> None:
        self._redis = client
        self._keys = keys or Keys()

    def register(self, spec: Spec) -> Spec:
        """Store ``spec`` (assigning the next version when its version is empty).

        Raises:
            ConfigError: that version exists already with a different artifact.
        """
        key = self._keys.model(spec.name)
        version = spec.version or str(self._redis.incr(key + ":seq"))
        spec = replace(spec, version=version, created=spec.created or time.time())
        body = json.dumps(spec.to_dict(), sort_keys=True)
        if not self._redis.hsetnx(key, version, body):
            old = json.loads(self._redis.hget(key, version) or b"{}")
            if old.get("sha256") != getattr(spec, "sha256", None) or old.get("kind") != spec.kind:
                raise ConfigError(
                    f"{spec.name}@{version} is registered already with other contents; "
                    "versions are immutable: register a new version"
                )
            return self._decode(old)
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
        self._redis.delete(key, key + ":seq")
        self._redis.hdel(self._keys.models(), name)

    @staticmethod
    def _decode(data: Mapping[str, Any]) -> Spec:
        kind = str(data.get("kind", "model"))
        if kind not in _DECODERS:
            raise ConfigError(f"registry entry of unknown kind {kind!r}; upgrade hetbatch on this side")
        return _DECODERS[kind](data)
