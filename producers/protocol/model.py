"""A registered model: what a producer and a worker agree on about one ``name@version``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from hetbatch.producers.errors import ConfigError, ModelNotFound
from hetbatch.producers.protocol.schema import TensorSpec
from hetbatch.producers.protocol.wire import DEVICES, FRAMEWORKS, queue_for

__all__ = ["ModelSpec", "parse_ref"]


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
        nan: ``reject`` (the default: a NaN or inf in a float input fails that job, before
            batching) or ``pass`` (hand it to the model).
        fallback: ``cpu`` lets a gpu model run on the cpu pool when no gpu worker is up.
        classes: class labels in output column order, for classifiers.
        options: framework-specific settings (methods, signature, providers, ...).
        output_bytes: bytes of one row's outputs, measured at registration (0: unknown);
            the client cuts jobs so a chunk's result stays within its byte budget.
        ragged_outputs: outputs of variable length per row: the model returns them
            padded along axis 1, and each row is cut back to its input's length.
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
    nan: str = "reject"
    fallback: str | None = None
    classes: tuple[Any, ...] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    created: float = 0.0
    kind: str = "model"
    output_bytes: int = 0
    ragged_outputs: tuple[str, ...] = ()

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
        out["ragged_outputs"] = list(self.ragged_outputs)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        known = set(cls.__dataclass_fields__)
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["inputs"] = tuple(TensorSpec.from_dict(t) for t in data["inputs"])
        kwargs["outputs"] = tuple(str(o) for o in data["outputs"])
        if data.get("classes") is not None:
            kwargs["classes"] = tuple(data["classes"])
        kwargs["ragged_outputs"] = tuple(str(o) for o in data.get("ragged_outputs") or ())
        return cls(**kwargs)
