"""Turn an ensemble config (``model.toml`` with ``kind = "ensemble"``) into a checked
``EnsembleSpec``: members resolved to exact versions, bad configs refused up front.

Example::

    kind = "ensemble"
    name = "iris-vote"
    strategy = "vote"            # mean (default) | weighted_mean | vote | stack | chain | select
    min_members = 2              # quorum (mean, weighted_mean, vote); default: all
    include_members = false      # add each member's raw outputs to the result
    [params]
    kind = "soft"                # vote: hard (default) | soft;  tie = "first" | "lowest"
    [[members]]
    name = "iris-forest@3"       # or just the name: the latest version, pinned now
    weight = 2.0
    output = "probabilities"     # which output the strategy reads

Output shapes are learned by calling each member once on a two-row probe batch
(the artifact is loaded on the CPU, as ``hetbatch models register`` does for models).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hetbatch.adapters import adapter_class
from hetbatch.producers.errors import ConfigError, ModelNotFound
from hetbatch.producers.protocol.ensemble import STRATEGIES, EnsembleSpec, Member
from hetbatch.producers.protocol.registry import ModelSpec, Registry, parse_ref
from hetbatch.producers.protocol.schema import TensorSpec
from hetbatch.worker.modelops.config import read_config

__all__ = ["build_ensemble", "ensemble_from_config", "probe_outputs"]

_KEYS = {"kind", "name", "version", "strategy", "members", "params", "min_members", "include_members"}
_MEMBER_KEYS = {"name", "weight", "output"}
Shapes = dict[str, tuple[int, ...]]


def build_ensemble(path: str | Path, registry: Registry, **overrides: Any) -> EnsembleSpec:
    """Read an ensemble directory's ``model.toml`` and validate it against ``registry``.

    Raises:
        ConfigError: the config is invalid (see ``ensemble_from_config``).
    """
    config, _ = read_config(path, known=_KEYS)
    config.update({k: v for k, v in overrides.items() if v is not None})
    return ensemble_from_config(config, registry)


def probe_outputs(model: ModelSpec) -> Shapes:
    """Per-row output shapes of ``model``, from one call on a two-row batch of zeros.

    Raises:
        ConfigError: the model cannot be loaded or run here.
    """
    inputs = {t.name: np.zeros((2, *t.shape), dtype=object if t.dtype == "string" else t.dtype) for t in model.inputs}
    try:
        adapter = adapter_class(model.framework)(
            model.artifact, options=dict(model.options), device="cpu", sha256=model.sha256, pinned=model.pinned
        ).load()
        try:
            out = adapter.predict(inputs)
        finally:
            adapter.unload()
    except Exception as exc:
        raise ConfigError(f"member {model.ref}: could not run it on a probe batch to learn its outputs: {exc}") from exc
    names = [n for n in model.outputs if n in out] or list(out)
    return {n: tuple(int(d) for d in np.asarray(out[n]).shape[1:]) for n in names}


def _member(name: str, registry: Registry, ref: str) -> ModelSpec:
    if parse_ref(ref)[0] == name:
        raise ConfigError(f"ensemble {name!r}: member {ref!r} is the ensemble itself (a cycle)")
    try:
        spec = registry.get(ref)
    except ModelNotFound:
        raise ConfigError(
            f"ensemble {name!r}: unknown member {ref!r}; register it first ('hetbatch models list' shows what is)"
        ) from None
    if getattr(spec, "kind", "model") != "model":
        raise ConfigError(f"ensemble {name!r}: member {ref!r} is an ensemble; nested ensembles are not supported")
    assert isinstance(spec, ModelSpec)
    return spec


def _weights(name: str, raw: Sequence[Mapping[str, Any]], params: dict[str, Any]) -> list[float | None]:
    listed = params.pop("weights", None)
    given = [m.get("weight") for m in raw]
    if listed is not None:
        if any(w is not None for w in given):
            raise ConfigError(f"ensemble {name!r}: weights given both in params.weights and on members")
        if len(listed) != len(raw):
            raise ConfigError(
                f"ensemble {name!r}: weights do not match members: {len(listed)} weights for {len(raw)} members"
            )
        given = list(listed)
    if any(w is None for w in given) and any(w is not None for w in given):
        missing = [m["name"] for m, w in zip(raw, given) if w is None]
        raise ConfigError(f"ensemble {name!r}: weights do not match members: no weight for {missing}")
    if all(w is None for w in given):
        return [None] * len(raw)
    weights = [float(w) for w in given if w is not None]
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"ensemble {name!r}: weights {weights} must be finite, >= 0, with a positive sum")
    return list(weights)


def _inputs(name: str, models: Sequence[ModelSpec]) -> tuple[TensorSpec, ...]:
    """The members' common inputs; dtypes may differ by a ``same_kind`` cast (the widest wins)."""
    first = models[0]
    out = []
    for tensor in first.inputs:
        peers = [next((t for t in m.inputs if t.name == tensor.name), None) for m in models]
        if any(p is None or p.shape != tensor.shape for p in peers) or any(
            len(m.inputs) != len(first.inputs) for m in models
        ):
            raise ConfigError(
                f"ensemble {name!r}: members do not share one input schema: "
                + "; ".join(f"{m.ref}: {[f'{t.name}:{t.describe()}' for t in m.inputs]}" for m in models)
            )
        dtypes = [p.dtype for p in peers if p is not None]
        if len(set(dtypes)) == 1:
            out.append(tensor)
            continue
        if "string" in dtypes:
            raise ConfigError(f"ensemble {name!r}: members disagree on input {tensor.name!r}: {dtypes}")
        wide = np.result_type(*dtypes)
        if not all(np.can_cast(wide, d, "same_kind") for d in dtypes):
            raise ConfigError(f"ensemble {name!r}: members disagree on input {tensor.name!r} dtypes {dtypes}")
        columns = tensor.columns if all(p is not None and p.columns == tensor.columns for p in peers) else None
        out.append(TensorSpec(tensor.name, wide.name, tensor.shape, columns))
    return tuple(out)


def _use(name: str, model: ModelSpec, shapes: Shapes, wanted: str | None, default: Sequence[str]) -> str:
    use = wanted or next((d for d in default if d in shapes), next(iter(shapes)))
    if use not in shapes:
        raise ConfigError(f"ensemble {name!r}: member {model.ref} has no output {use!r}; its outputs: {list(shapes)}")
    return use


def _class_aligned(name: str, models: Sequence[ModelSpec], shapes: Sequence[tuple[int, ...]]) -> tuple[Any, ...] | None:
    """The ensemble's class order when every used output is one column per class."""
    if any(m.classes is None for m in models) or any(s != (len(m.classes or ()),) for m, s in zip(models, shapes)):
        return None
    first = models[0].classes or ()
    for m in models[1:]:
        if set(m.classes or ()) != set(first):
            raise ConfigError(
                f"ensemble {name!r}: members' classes differ: "
                f"{models[0].ref} {list(first)}, {m.ref} {list(m.classes or ())}"
            )
    return tuple(first)


def _chain_order(name: str, names: list[str], links: Sequence[Mapping[str, Any]]) -> list[int]:
    """Member positions in chain order, from ``links`` ({from, to, map}); refuses forks and cycles."""
    succ: dict[int, int] = {}
    pred: dict[int, int] = {}
    for link in links:
        ends = [link.get("from"), link.get("to")]
        if any(e not in names for e in ends):
            raise ConfigError(f"ensemble {name!r}: chain link {dict(link)} names a non-member; members: {names}")
        a, b = (names.index(str(e)) for e in ends)
        if a in succ or b in pred:
            raise ConfigError(f"ensemble {name!r}: chain link {dict(link)} forks or joins the chain; a chain is a path")
        succ[a], pred[b] = b, a
    for start in succ:
        seen, node = [start], start
        while node in succ:
            node = succ[node]
            if node in seen:
                path = " -> ".join(names[i] for i in [*seen[seen.index(node) :], node])
                raise ConfigError(f"ensemble {name!r}: cycle in chain: {path}")
            seen.append(node)
    heads = [i for i in range(len(names)) if i not in pred]
    order = [heads[0]] if heads else []
    while order and order[-1] in succ:
        order.append(succ[order[-1]])
    if len(order) != len(names):
        raise ConfigError(f"ensemble {name!r}: chain links do not join all members {names} into one path")
    return order


def _chain_maps(
    name: str, models: Sequence[ModelSpec], shapes: Sequence[Shapes], maps: list[Any]
) -> list[dict[str, str]]:
    out = []
    for k, (prev, nxt) in enumerate(itertools.pairwise(models)):
        mapping = maps[k]
        if not mapping:
            if len(shapes[k]) != 1 or len(nxt.inputs) != 1:
                raise ConfigError(
                    f"ensemble {name!r}: link {prev.ref} -> {nxt.ref} needs a map (output -> input): "
                    f"outputs {list(shapes[k])}, inputs {[t.name for t in nxt.inputs]}"
                )
            mapping = {next(iter(shapes[k])): nxt.inputs[0].name}
        targets = {t.name: t for t in nxt.inputs}
        for out_name, in_name in mapping.items():
            if out_name not in shapes[k] or in_name not in targets:
                raise ConfigError(f"ensemble {name!r}: link {prev.ref} -> {nxt.ref}: bad map {out_name} -> {in_name}")
            if shapes[k][out_name] != targets[in_name].shape:
                raise ConfigError(
                    f"ensemble {name!r}: incompatible output shapes: {prev.ref}.{out_name} is "
                    f"{list(shapes[k][out_name])}, {nxt.ref} input {in_name} needs {list(targets[in_name].shape)}"
                )
        if set(mapping.values()) != set(targets):
            raise ConfigError(f"ensemble {name!r}: link {prev.ref} -> {nxt.ref} leaves inputs unfed: {sorted(targets)}")
        out.append({str(k2): str(v) for k2, v in mapping.items()})
    return out


def _rule(name: str, rule: Mapping[str, Any], names: list[str], inputs: Sequence[TensorSpec]) -> dict[str, Any]:
    tensor = next((t for t in inputs if t.name == rule.get("input")), None)
    if tensor is None:
        raise ConfigError(
            f"ensemble {name!r}: select rule reads input {rule.get('input')!r}; inputs: {[t.name for t in inputs]}"
        )
    index = rule.get("index")
    if isinstance(index, str) and tensor.columns and index in tensor.columns:
        index = tensor.columns.index(index)
    if (index is None) != (tensor.size == 1 and not tensor.shape) or (
        index is not None and not 0 <= index < tensor.size
    ):
        raise ConfigError(
            f"ensemble {name!r}: select rule index {rule.get('index')!r} does not fit input {tensor.name}"
        )

    def slot(member: Any) -> int:
        if member not in names:
            raise ConfigError(f"ensemble {name!r}: select rule routes to {member!r}, not a member ({names})")
        return names.index(member)

    out: dict[str, Any] = {"input": tensor.name, "index": index}
    if "bins" in rule:
        bins = [float(b) for b in rule["bins"]]
        if bins != sorted(bins) or len(rule.get("routes", ())) != len(bins) + 1:
            raise ConfigError(f"ensemble {name!r}: select rule needs ascending bins and len(bins) + 1 routes")
        return out | {"bins": bins, "routes": [slot(m) for m in rule["routes"]]}
    if "match" in rule and "default" in rule:
        return out | {"match": [[v, slot(m)] for v, m in dict(rule["match"]).items()], "default": slot(rule["default"])}
    raise ConfigError(f"ensemble {name!r}: a select rule needs bins + routes, or match + default")


def ensemble_from_config(config: Mapping[str, Any], registry: Registry) -> EnsembleSpec:
    """Validate an ensemble config and resolve it against the registry.

    Raises:
        ConfigError: unknown strategy or member, weights that do not match the members,
            incompatible inputs or output shapes, a cycle or fork in a chain, a bad rule.
    """
    name, strategy = str(config.get("name", "")), str(config.get("strategy", "mean"))
    if not name or strategy not in STRATEGIES:
        raise ConfigError(f"ensemble {name!r}: needs a name and a strategy, one of {STRATEGIES}")
    raw = list(config.get("members") or [])
    bad = [m for m in raw if not isinstance(m, Mapping) or "name" not in m or set(m) - _MEMBER_KEYS]
    if not raw or bad:
        raise ConfigError(f"ensemble {name!r}: members must be [[members]] tables with keys {sorted(_MEMBER_KEYS)}")
    params = dict(config.get("params") or {})
    weights = _weights(name, raw, params)
    if strategy == "weighted_mean" and weights[0] is None:
        raise ConfigError(f"ensemble {name!r}: weighted_mean needs a weight for every member")
    models = [_member(name, registry, str(m["name"])) for m in raw]
    names = [str(m["name"]) for m in raw]
    min_members = config.get("min_members")
    if strategy not in ("mean", "weighted_mean", "vote") and min_members not in (None, len(raw)):
        raise ConfigError(f"ensemble {name!r}: min_members applies to mean, weighted_mean and vote only")
    outputs: tuple[str, ...] = ()
    classes: tuple[Any, ...] | None = None
    if strategy == "chain":
        order = _chain_order(name, names, params.get("links") or [])
        maps = {(link["from"], link["to"]): link.get("map") for link in params.pop("links", None) or []}
        raw, models, weights = [raw[i] for i in order], [models[i] for i in order], [weights[i] for i in order]
        listed = [maps.get((names[a], names[b])) for a, b in itertools.pairwise(order)]
        names = [names[i] for i in order]
        shapes = [probe_outputs(m) for m in models]
        params["maps"] = _chain_maps(name, models, shapes, listed)
        inputs, outputs, classes = models[0].inputs, tuple(shapes[-1]), models[-1].classes
    else:
        inputs = _inputs(name, models)
        shapes = [probe_outputs(m) for m in models]
    kind = params.setdefault("kind", "hard") if strategy == "vote" else None
    defaults = {"vote": ["label"] if kind == "hard" else ["probabilities"]}.get(strategy, ["probabilities"])
    if strategy == "chain":
        uses = [str(m.get("output") or next(iter(s))) for m, s in zip(raw, shapes)]
    else:
        uses = [_use(name, mod, s, m.get("output"), defaults) for m, mod, s in zip(raw, models, shapes)]
    used = [s[u] for s, u in zip(shapes, uses)]
    if strategy in ("mean", "weighted_mean", "vote"):
        classes = _class_aligned(name, models, used)
        if kind == "soft" and classes is None:
            raise ConfigError(
                f"ensemble {name!r}: soft vote aligns class probabilities by label; every member needs classes "
                f"(state classes = [...] in its model.toml) and a per-class output: {dict(zip(names, used))}"
            )
        if (classes is None and len(set(used)) > 1) or (kind == "hard" and any(s not in ((), (1,)) for s in used)):
            raise ConfigError(
                f"ensemble {name!r}: incompatible output shapes: {dict(zip([*map(str, uses)], used))} "
                f"of members {names}"
            )
        if params.get("tie", "first") not in ("first", "lowest") or kind not in (None, "hard", "soft"):
            raise ConfigError(f"ensemble {name!r}: vote takes kind = hard|soft and tie = first|lowest")
        names_out = ("label", "probabilities") if kind == "soft" else ("label",)
        outputs = names_out if kind is not None else (str(params.setdefault("output_name", uses[0])),)
    elif strategy == "stack":
        if "meta" not in params:
            raise ConfigError(f"ensemble {name!r}: stack needs params.meta, the registered meta-model")
        meta = _member(name, registry, str(params["meta"]))
        params["meta"] = meta.ref
        width = sum(math.prod(s) for s in used)
        if len(meta.inputs) != 1 or meta.inputs[0].size != width:
            raise ConfigError(
                f"ensemble {name!r}: incompatible output shapes: members' {uses} give {width} features, "
                f"meta-model {meta.ref} takes {[t.describe() for t in meta.inputs]}"
            )
        outputs, classes = tuple(probe_outputs(meta)), meta.classes
    elif strategy == "select":
        if any(s != shapes[0] for s in shapes):
            raise ConfigError(f"ensemble {name!r}: incompatible output shapes: {dict(zip(names, shapes))}")
        if "rule" in params:
            params["rule"] = _rule(name, params["rule"], names, inputs)
        if "choice" in params:
            if params["choice"] not in names:
                raise ConfigError(f"ensemble {name!r}: choice {params['choice']!r} is not a member ({names})")
            params["choice"] = models[names.index(params["choice"])].ref
        outputs = tuple(shapes[0])
        same = all(m.classes == models[0].classes for m in models)
        classes = models[0].classes if same else None
    members = tuple(Member(m.ref, w, u) for m, w, u in zip(models, weights, uses))
    return EnsembleSpec(
        name=name,
        strategy=strategy,
        members=members,
        inputs=tuple(inputs),
        outputs=outputs,
        params=params,
        min_members=min_members,
        include_members=bool(config.get("include_members", False)),
        classes=classes,
        version=str(config.get("version", "")),
    )
