"""Ensembles: registry entries that combine several registered models into one answer.

An ensemble is submitted like a model (``Client.submit("my-ensemble", data)``) and
runs in *stages*. A stage publishes one task per member *slot* to that member's own
queue; each task carries a ``Continuation`` (``TaskEnvelope.then``) so the worker that
stores the last member result of a chunk enqueues the fusion step, which either
writes the fused result under the ensemble job's result key or plans the next stage:

========================  =================================================
strategy                  stages
========================  =================================================
mean, weighted_mean,      0: every member
vote                      (fused at the end of stage 0)
select                    0: the recorded choice, or every member on the
                          rows its ``rule`` routes to it
stack                     0: every member; 1: the meta-model (slot ``n``)
chain                     k: member k, fed with member k-1's mapped outputs
========================  =================================================

Slots are member positions; slot ``len(members)`` is a stack's meta-model. The
planning here is shared by the client (stage 0) and the worker (later stages), so the
two sides cannot disagree on key names or routing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from hetbatch.producers.errors import ConfigError, HetbatchError, PayloadError, RemoteError
from hetbatch.producers.protocol.fields import MAX_TEXT, Fields
from hetbatch.producers.protocol.keys import Keys, is_reply
from hetbatch.producers.protocol.model import ModelSpec, parse_ref
from hetbatch.producers.protocol.schema import TensorSpec, table_to_arrays, to_table
from hetbatch.producers.protocol.wire import Item, TaskEnvelope, encode_table

__all__ = [
    "STRATEGIES",
    "Continuation",
    "EnsembleSpec",
    "Member",
    "MemberFailed",
    "StagePlan",
    "member_job_id",
    "plan_stage",
    "refused_job",
    "route_rows",
    "stage_input_key",
]

STRATEGIES = ("mean", "weighted_mean", "vote", "stack", "chain", "select")


class MemberFailed(HetbatchError):
    """An ensemble member's job failed and the ensemble's quorum could not absorb it."""

    def __init__(self, member: str, remote: RemoteError, note: str = "") -> None:
        super().__init__(f"ensemble member {member} failed: {remote.type}: {remote.message}{note}")
        self.member = member
        self.remote = remote

    def details(self) -> dict[str, Any]:
        return {"member": self.member, "member_error": self.remote.type, **self.remote.details}


# Bounds of a continuation: an ensemble has a handful of members and stages (a chain is one
# stage per member); the worker builds key names over them, so they are capped.
MAX_SLOTS = 256
MAX_STAGES = 256


@dataclass(frozen=True)
class Member:
    """One member of an ensemble.

    Attributes:
        ref: ``name@version``; always exact once registered.
        weight: relative weight (weighted_mean, weighted votes); None means 1.
        output: which output column the strategy reads (None: the strategy's default).
    """

    ref: str
    weight: float | None = None
    output: str | None = None

    @property
    def name(self) -> str:
        return parse_ref(self.ref)[0]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Member:
        weight = data.get("weight")
        return cls(str(data["ref"]), float(weight) if weight is not None else None, data.get("output"))


@dataclass(frozen=True)
class EnsembleSpec:
    """A registered ensemble (built and validated by ``worker/ensemble_config.py``).

    Attributes:
        name: registry name.
        strategy: one of ``STRATEGIES``.
        members: member models, resolved to exact versions (chain: in chain order).
        inputs: what the client validates data against (the first stage's inputs).
        outputs: the fused result's columns.
        params: strategy parameters, resolved (``meta``, ``maps``, ``rule``, ``choice``...).
        min_members: members that must succeed (quorum); None means all.
        include_members: add each member's raw outputs to the fused result.
        classes: class labels of the fused probabilities, when the members have them.
        sha256: digest of the definition, so re-registering the same one is a no-op.
    """

    name: str
    strategy: str
    members: tuple[Member, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[str, ...]
    params: Mapping[str, Any] = field(default_factory=dict)
    min_members: int | None = None
    include_members: bool = False
    classes: tuple[Any, ...] | None = None
    version: str = ""
    sha256: str = ""
    created: float = 0.0
    kind: str = "ensemble"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"ensemble {self.name!r}: strategy {self.strategy!r} is not one of {STRATEGIES}")
        if not self.members:
            raise ConfigError(f"ensemble {self.name!r}: lists no members")
        if self.min_members is not None and not 1 <= self.min_members <= len(self.members):
            raise ConfigError(
                f"ensemble {self.name!r}: min_members={self.min_members} must be between 1 and "
                f"{len(self.members)} (the number of members)"
            )
        if not self.sha256:
            object.__setattr__(self, "sha256", self.digest())

    def digest(self) -> str:
        """sha256 of everything that defines the ensemble (not its version or date)."""
        body = self.to_dict()
        for key in ("version", "created", "sha256"):
            body.pop(key)
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def required(self) -> int:
        return self.min_members or len(self.members)

    @property
    def final_stage(self) -> int:
        if self.strategy == "chain":
            return len(self.members) - 1
        return 1 if self.strategy == "stack" else 0

    def slots(self, stage: int) -> tuple[int, ...]:
        """Member slots that run in ``stage``."""
        if self.strategy == "chain":
            return (stage,)
        if self.strategy == "stack" and stage == 1:
            return (len(self.members),)
        if self.strategy == "select" and "rule" not in self.params:
            return (self.choice,)
        return tuple(range(len(self.members)))

    @property
    def choice(self) -> int:
        """The member slot a rule-less select runs (the evaluated best, else the first)."""
        chosen = self.params.get("choice")
        refs = [m.ref for m in self.members]
        return refs.index(chosen) if chosen in refs else 0

    def slot_ref(self, slot: int) -> str:
        return self.members[slot].ref if slot < len(self.members) else str(self.params["meta"])

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["members"] = [asdict(m) for m in self.members]
        out["inputs"] = [t.to_dict() for t in self.inputs]
        out["outputs"] = list(self.outputs)
        out["params"] = dict(self.params)
        out["classes"] = list(self.classes) if self.classes is not None else None
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EnsembleSpec:
        known = set(cls.__dataclass_fields__)
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["members"] = tuple(Member.from_dict(m) for m in data["members"])
        kwargs["inputs"] = tuple(TensorSpec.from_dict(t) for t in data["inputs"])
        kwargs["outputs"] = tuple(str(o) for o in data["outputs"])
        kwargs["params"] = dict(data.get("params") or {})
        if data.get("classes") is not None:
            kwargs["classes"] = tuple(data["classes"])
        return cls(**kwargs)


@dataclass(frozen=True)
class Continuation:
    """What a member task hands on: which ensemble chunk and stage it belongs to.

    It rides in ``TaskEnvelope.then`` and is, unchanged, the body of the fusion task.
    ``slots`` are the slots published for this chunk and stage: the fusion step waits
    for exactly these.
    """

    ensemble: str
    job_id: str
    chunk: int
    stage: int
    slots: tuple[int, ...]
    rows: int
    reply_to: str | None = None
    deadline: float | None = None
    priority: int = 5
    trace: str | None = None  # the job's traceparent, set by the worker that hands on (tracing on)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["slots"] = list(self.slots)
        if self.trace is None:
            del out["trace"]
        return out

    @classmethod
    def from_dict(cls, data: Any) -> Continuation:
        """Parse a continuation (an envelope's ``then`` or a fusion task's body): every field
        typed and bounded, since anyone who can write to a queue can write one.

        Raises:
            PayloadError: not a valid continuation.
        """
        if not isinstance(data, Mapping):
            raise PayloadError(f"malformed ensemble continuation: not an object but {type(data).__name__}")
        f = Fields(data)
        f.job = f.ident("job_id")
        reply_to = f.opt_text("reply_to")
        if reply_to is not None and not is_reply(reply_to):
            f.fail("reply_to", f"names {reply_to[:60]!r}, which is not a reply list")
        priority = data.get("priority", 5)
        cont = cls(
            ensemble=f.text("ensemble"),
            job_id=f.job,
            chunk=f.count("chunk", data.get("chunk")),
            stage=f.count("stage", data.get("stage"), MAX_STAGES),
            slots=tuple(f.count("slots", s, MAX_SLOTS) for s in f.seq("slots", limit=MAX_SLOTS)),
            rows=f.count("rows", data.get("rows")),
            reply_to=reply_to,
            deadline=f.number("deadline"),
            priority=f.count("priority", priority, 9),
            trace=f.trace("trace"),
        )
        if len(set(cont.slots)) != len(cont.slots):
            f.fail("slots", "lists a slot twice")
        return cont


def refused_job(data: Any) -> tuple[str, int, str | None] | None:
    """The ensemble job chunk and reply list a continuation ``Continuation.from_dict``
    refused still names, each only when it passes its own check; None when no job can be
    named. Storing the refusal as that chunk's result answers its producer (no hang)."""
    if not isinstance(data, Mapping):
        return None
    f = Fields(data)
    try:
        job_id, chunk = f.ident("job_id"), f.count("chunk", data.get("chunk"))
    except PayloadError:
        return None
    reply = data.get("reply_to")
    return job_id, chunk, reply if isinstance(reply, str) and len(reply) <= MAX_TEXT and is_reply(reply) else None


def member_job_id(job_id: str, stage: int, slot: int) -> str:
    """The item job id of one member slot's share of an ensemble job."""
    return f"{job_id}~{stage}.{slot}"


def stage_input_key(keys: Keys, job_id: str, stage: int, chunk: int) -> str:
    """Where a stage's shared input lives (stage 0: the ensemble job's own input key)."""
    return keys.input(job_id if stage == 0 else f"{job_id}~{stage}", chunk)


def route_rows(spec: EnsembleSpec, table: pa.Table) -> np.ndarray:
    """The member slot of each row under a select ensemble's ``rule`` (pure, deterministic).

    A rule reads one input (``input``), optionally one position of it (``index``), and
    routes by ``bins`` (ascending edges; ``routes`` has one slot per bin, ``np.digitize``
    semantics) or by ``match`` (``[[value, slot], ...]`` with a ``default`` slot).
    """
    rule = spec.params["rule"]
    tensor = next(t for t in spec.inputs if t.name == rule["input"])
    values = table_to_arrays(table, [tensor])[tensor.name]
    if rule.get("index") is not None:
        values = values.reshape(len(values), -1)[:, int(rule["index"])]
    if "bins" in rule:
        bins = np.asarray(rule["bins"], dtype=np.float64)
        routes: np.ndarray = np.asarray(rule["routes"], dtype=np.int64)[np.digitize(values, bins)]
        return routes
    out = np.full(len(values), int(rule["default"]), dtype=np.int64)
    for value, slot in rule["match"]:
        out[values == value] = int(slot)
    return out


def _fits(table: pa.Table, inputs: tuple[TensorSpec, ...]) -> bool:
    names = {f.name: f.type for f in table.schema}
    return all(names.get(t.name) == t.arrow_type for t in inputs)


@dataclass(frozen=True)
class StagePlan:
    """What to store (Redis key -> Arrow IPC) and publish ((queue, envelope)) for a stage."""

    blobs: dict[str, bytes | memoryview]
    tasks: list[tuple[str, TaskEnvelope]]
    continuation: Continuation


def plan_stage(
    spec: EnsembleSpec,
    *,
    job_id: str,
    chunk: int,
    stage: int,
    table: pa.Table,
    models: Callable[[str], ModelSpec],
    keys: Keys,
    reply_to: str | None,
    deadline: float | None,
    priority: int,
) -> StagePlan:
    """Plan one chunk's stage: the stage input is stored once and shared by the members
    whose input types match it; a member that needs other dtypes (``same_kind`` cast,
    e.g. float64 -> float32 for an ONNX conversion) or a routed subset gets its own copy.

    Raises:
        SchemaMismatch: the stage input cannot be cast to a member's inputs.
    """
    shared = stage_input_key(keys, job_id, stage, chunk)
    blobs: dict[str, bytes | memoryview] = {shared: encode_table(table)}
    route = route_rows(spec, table) if stage == 0 and "rule" in spec.params else None
    parts: list[tuple[int, ModelSpec, str, int]] = []
    for slot in spec.slots(stage):
        model = models(spec.slot_ref(slot))
        part = table if route is None else table.take(pa.array(np.flatnonzero(route == slot)))
        if part.num_rows == 0:
            continue
        key = shared
        if route is not None or not _fits(part, model.inputs):
            key = keys.input(member_job_id(job_id, stage, slot), chunk)
            blobs[key] = encode_table(to_table(part, model.inputs, cast="same_kind"))
        parts.append((slot, model, key, part.num_rows))
    cont = Continuation(
        spec.ref, job_id, chunk, stage, tuple(p[0] for p in parts), table.num_rows, reply_to, deadline, priority
    )
    tasks = [
        (
            model.queue,
            TaskEnvelope(
                model=model.name,
                version=model.version,
                items=(Item(member_job_id(job_id, stage, slot), chunk, rows),),
                payload_key=key,
                deadline=deadline,
                then=cont.to_dict(),
            ),
        )
        for slot, model, key, rows in parts
    ]
    return StagePlan(blobs, tasks, cont)
