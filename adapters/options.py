"""Typed adapter options: model.toml's ``[options]`` table read into a frozen dataclass.

Each adapter declares its options as a subclass of ``Options`` (its fields are the keys
it reads); ``Options.parse`` refuses a key no field names, and a value whose type does
not fit the field, so a typo in ``model.toml`` is an error at registration, not a
setting silently ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from hetbatch.adapters.errors import InvalidOptions

__all__ = ["Capabilities", "Options"]

_O = TypeVar("_O", bound="Options")

# Keys that were renamed: the error says the new name.
_RENAMED = {"kwargs": "module_kwargs"}


@dataclass(frozen=True)
class Capabilities:
    """What the worker's model cache may do with an adapter's models (declared by the adapter).

    Attributes:
        calibrated_threads: each loaded instance owns its thread pool, so the cache may
            measure one single-threaded instance per core against one call over every core.
        instance_per_core: each call runs on one thread: run one instance per core.
        couples_rows: a row's outputs depend on the other rows of its call (e.g. dynamic
            quantization's per-call scale): a job's rows are never merged with others or cut.
    """

    calibrated_threads: bool = False
    instance_per_core: bool = False
    couples_rows: bool = False


@dataclass(frozen=True)
class Options:
    """Options every adapter takes.

    Attributes:
        threads: intra-op threads per call (0: the framework's default); the worker sets it
            when the entry leaves it open.
        instances: model calls that may run at once in a cpu worker (0: the worker decides).
        source: the ``name@version`` this model was derived from (written by ``hetbatch
            convert``/``quantize``/``optimize``; informational).
    """

    threads: int = 0
    instances: int = 0
    source: str | None = None

    @classmethod
    def parse(cls: type[_O], raw: Mapping[str, Any] | Options | None, framework: str = "") -> _O:
        """Check ``raw`` against the fields and build the options.

        Raises:
            InvalidOptions: an unknown key (named, with the known ones) or a value of the wrong type.
        """
        if isinstance(raw, cls):
            return raw
        values = dataclasses.asdict(raw) if isinstance(raw, Options) else dict(raw or {})
        hints = typing.get_type_hints(cls)
        known = sorted(f.name for f in dataclasses.fields(cls))
        where = f"[options] of a {framework} model" if framework else "[options]"
        unknown = sorted(set(values) - set(known))
        if unknown:
            renamed = [f"{k!r} is now {_RENAMED[k]!r}" for k in unknown if _RENAMED.get(k) in known]
            hint = f" ({'; '.join(renamed)})" if renamed else ""
            raise InvalidOptions(f"{where}: unknown key(s) {unknown}{hint}; known: {known}")
        for key, value in values.items():
            if not _fits(value, hints[key]):
                raise InvalidOptions(f"{where}: {key} = {value!r} is not a {_name(hints[key])}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The options that differ from their defaults (what a model.toml would say)."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return {k: v for k, v in dataclasses.asdict(self).items() if v != defaults.get(k)}


def _fits(value: Any, hint: Any) -> bool:
    """Whether a TOML value fits a field's annotation (the subset of types options use)."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is Literal:
        return value in args
    if origin is list or origin is tuple:
        inner = args[0] if args else Any
        return isinstance(value, (list, tuple)) and all(_fits(v, inner) for v in value)
    if origin is dict or origin is Mapping:
        inner = args[1] if len(args) == 2 else Any
        return isinstance(value, Mapping) and all(isinstance(k, str) and _fits(v, inner) for k, v in value.items())
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(hint, type) and isinstance(value, hint)


def _name(hint: Any) -> str:
    return str(hint).replace("typing.", "") if not isinstance(hint, type) else hint.__name__
