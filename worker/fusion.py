"""Fusion strategies: pure functions over the members' numpy outputs, looked up by name.

Every strategy has the signature ``(members, params) -> named (N, ...) arrays``, where
``members`` are the *successful* members in ensemble order (a quorum may have dropped
some) and ``params`` the ensemble's resolved parameters plus what the execution step
adds (``classes``, ``route``, ``rows``). No broker, no Redis: tests call them directly
and the worker's fusion step calls the very same functions.

Class probabilities are always aligned **by label** before they are combined: a
member whose columns are ``[2, 0, 1]`` contributes its first column to class 2.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hetbatch.producers.errors import ConfigError

__all__ = [
    "STRATEGIES",
    "MemberOutput",
    "align",
    "chain",
    "fuse",
    "mean",
    "select",
    "stack",
    "strategy",
    "vote",
    "weighted_mean",
]

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class MemberOutput:
    """One member's outputs for one chunk.

    Attributes:
        name: the member's ``name@version`` (used in errors and ``include_members``).
        outputs: every output column of the member, (N, ...) arrays.
        use: the output the strategy reads.
        weight: the member's weight (1 when the ensemble gives none).
        classes: labels of the member's probability columns, in column order.
        slot: the member's position in the ensemble (rule-based select routes by it).
    """

    name: str
    outputs: Mapping[str, np.ndarray]
    use: str
    weight: float = 1.0
    classes: tuple[Any, ...] | None = None
    slot: int = 0

    @property
    def values(self) -> np.ndarray:
        return self.outputs[self.use]


def _label(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def align(member: MemberOutput, classes: Sequence[Any]) -> np.ndarray:
    """The member's probability columns reordered to ``classes``, matched by label.

    Raises:
        ValueError: the member has no class labels, or lacks one of ``classes``.
    """
    if member.classes is None:
        raise ValueError(f"member {member.name} declares no classes; its columns cannot be aligned by label")
    position = {_label(c): i for i, c in enumerate(member.classes)}
    missing = [c for c in classes if _label(c) not in position]
    if missing:
        raise ValueError(f"member {member.name} has no class {missing[0]!r} (its classes: {list(member.classes)})")
    values = member.values
    if values.ndim != 2 or values.shape[1] != len(member.classes):
        raise ValueError(f"member {member.name}: output {member.use!r} of shape {values.shape} is not per-class")
    return values[:, [position[_label(c)] for c in classes]]


def _stacked(members: Sequence[MemberOutput], classes: Sequence[Any] | None) -> np.ndarray:
    arrays = [align(m, classes) if classes is not None else m.values for m in members]
    return np.stack([np.asarray(a, dtype=np.float64) for a in arrays])


def _weights(members: Sequence[MemberOutput]) -> np.ndarray:
    weights = np.asarray([m.weight for m in members], dtype=np.float64)
    if weights.sum() <= 0:
        raise ValueError(f"the weights of {[m.name for m in members]} sum to {weights.sum()}, not a positive number")
    return weights


def mean(members: Sequence[MemberOutput], params: Mapping[str, Any]) -> Arrays:
    """Unweighted mean of the used output (probabilities aligned by label when ``classes``)."""
    return {str(params.get("output_name", members[0].use)): _stacked(members, params.get("classes")).mean(axis=0)}


def weighted_mean(members: Sequence[MemberOutput], params: Mapping[str, Any]) -> Arrays:
    """Mean weighted by each member's ``weight``, renormalized over the members present."""
    weights = _weights(members)
    fused = np.tensordot(weights, _stacked(members, params.get("classes")), axes=1) / weights.sum()
    return {str(params.get("output_name", members[0].use)): fused}


def vote(members: Sequence[MemberOutput], params: Mapping[str, Any]) -> Arrays:
    """Majority vote over labels (``kind="hard"``, the default) or soft vote over class
    probabilities (``kind="soft"``), both weighted by member weights.

    Hard-vote ties: ``tie="first"`` (default) gives the row to the tied label voted by
    the earliest member in ensemble order; ``tie="lowest"`` to the smallest tied label.
    Soft-vote ties go to the earlier class in ``classes`` (``argmax``).
    """
    weights = _weights(members)
    if params.get("kind", "hard") == "soft":
        classes = params["classes"]
        probabilities = np.tensordot(weights, _stacked(members, classes), axes=1) / weights.sum()
        return {"label": np.asarray(classes)[probabilities.argmax(axis=1)], "probabilities": probabilities}
    labels = np.stack([np.asarray(m.values).reshape(len(m.values)) for m in members])  # (members, rows)
    uniques, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(labels.shape)
    rows = np.arange(labels.shape[1])
    counts = np.zeros((labels.shape[1], len(uniques)))
    np.add.at(counts, (np.broadcast_to(rows, labels.shape), inverse), weights[:, None])
    tied = np.isclose(counts, counts.max(axis=1, keepdims=True))
    if params.get("tie", "first") == "lowest":
        winner = tied.argmax(axis=1)
    else:
        member_tied = tied[rows[None, :], inverse]  # (members, rows): did member m vote a tied label?
        winner = inverse[member_tied.argmax(axis=0), rows]
    return {"label": uniques[winner]}


def stack(members: Sequence[MemberOutput], params: Mapping[str, Any]) -> Arrays:
    """The meta-model's features: members' used outputs side by side, in member order.

    Positional on purpose: the meta-model was trained on each member's own column order.
    """
    rows = len(members[0].values)
    parts = [np.asarray(m.values, dtype=np.float64).reshape(rows, -1) for m in members]
    return {"features": np.concatenate(parts, axis=1)}


def chain(members: Sequence[MemberOutput], params: Mapping[str, Any]) -> Arrays:
    """The next link's inputs: the previous member's outputs renamed by ``map`` (output -> input)."""
    (member,) = members
    return {str(inp): member.outputs[str(out)] for out, inp in params["map"].items()}


def select(members: Sequence[MemberOutput], params: Mapping[str, Any]) -> Arrays:
    """The chosen member's outputs, or, with a per-row ``route`` (slot per row), each row
    taken from the member it was routed to (members ran only on their own rows)."""
    route = params.get("route")
    if route is None:
        return dict(members[0].outputs)
    out: Arrays = {}
    for name, first in members[0].outputs.items():
        dtype = np.result_type(*(m.outputs[name] for m in members))
        merged = np.zeros((len(route), *first.shape[1:]), dtype=dtype)
        for member in members:
            merged[route == member.slot] = member.outputs[name]
        out[name] = merged
    return out


Strategy = Callable[[Sequence[MemberOutput], Mapping[str, Any]], Arrays]
STRATEGIES: dict[str, Strategy] = {
    "mean": mean,
    "weighted_mean": weighted_mean,
    "vote": vote,
    "stack": stack,
    "chain": chain,
    "select": select,
}


def strategy(name: str) -> Strategy:
    """The strategy function registered as ``name``.

    Raises:
        ConfigError: no such strategy.
    """
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ConfigError(f"unknown fusion strategy {name!r}; known: {sorted(STRATEGIES)}") from None


def fuse(name: str, members: Sequence[MemberOutput], params: Mapping[str, Any]) -> Arrays:
    """Run strategy ``name`` and check every output has one row per input row.

    Raises:
        ConfigError: unknown strategy.
        ValueError: no members, or the strategy produced the wrong number of rows.
    """
    if not members:
        raise ValueError("nothing to fuse: no member succeeded")
    fn = strategy(name)
    rows = int(params["rows"]) if "rows" in params else len(members[0].values)
    out = fn(members, params)
    bad = {k: len(v) for k, v in out.items() if len(v) != rows}
    if bad:
        raise ValueError(f"strategy {name!r} returned {bad} rows for {rows} input rows")
    return out
