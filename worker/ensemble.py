"""Running ensembles on workers: count member completions, fuse, store, hand on.

Member tasks are ordinary predict tasks whose envelope carries a ``Continuation``.
After a member's result is stored, ``on_stored`` (an after-store hook of the runtime) adds the item to the chunk's
completion set in one Lua call; the call that completes the set enqueues the fusion
task on ``fusion.cpu``. The fusion task reads the members' stored results from Redis
(so they survive the death of a fusion worker: ``acks_late`` redelivers the task and
it starts over), then either writes the fused result under the ensemble job's result
key and notifies the producer (the same ``ResultWriter`` as single models), or plans
and publishes the next stage (stack's meta-model, chain's next link).

Every step is idempotent: the completion set ignores repeats, results are stored
first-write-wins, and a fusion task finding the fused result stored does nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, cast

import numpy as np
import pyarrow as pa
import redis

from hetbatch.producers.errors import ConfigError, JobExpired, JobLost, PayloadError, RemoteError
from hetbatch.producers.protocol import parts, tracing
from hetbatch.producers.protocol.ensemble import (
    Continuation,
    EnsembleSpec,
    MemberFailed,
    member_job_id,
    plan_stage,
    refused_job,
    route_rows,
    stage_input_key,
)
from hetbatch.producers.protocol.registry import parse_ref
from hetbatch.producers.protocol.schema import arrays_to_table, to_table
from hetbatch.producers.protocol.scripts import script
from hetbatch.producers.protocol.wire import (
    FUSE_TASK_NAME,
    FUSION_QUEUE,
    TASK_NAME,
    TaskEnvelope,
    decode_result,
    decode_table,
    encode_error,
    encode_result,
)
from hetbatch.producers.steps import Mget, Step, join_steps, run
from hetbatch.worker.fusion import MemberOutput, fuse
from hetbatch.worker.hooks import Finished, Hook
from hetbatch.worker.results import Outcome, library_error
from hetbatch.worker.runtime import Runtime

__all__ = ["EnsembleRunner", "Send", "result_arrays"]

log = logging.getLogger(__name__)

# (task name, queue, body, priority): publishes one task; the Celery app provides it.
Send = Callable[[str, str, dict[str, Any], int], None]

_PARALLEL = ("mean", "weighted_mean", "vote")  # the strategies a quorum applies to


def result_arrays(table: pa.Table) -> dict[str, np.ndarray]:
    """A stored result table -> named (N, ...) numpy arrays (inverse of ``arrays_to_table``)."""
    out: dict[str, np.ndarray] = {}
    for fld, col in zip(table.schema, table.columns):
        arr = col.combine_chunks()
        if pa.types.is_fixed_size_list(arr.type):
            values = arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)
            if fld.metadata and b"shape" in fld.metadata:
                values = values.reshape(len(arr), *json.loads(fld.metadata[b"shape"]))
            out[fld.name] = values
        else:
            out[fld.name] = arr.to_numpy(zero_copy_only=False)
    return out


class EnsembleRunner(Hook):
    """The ensemble side of a worker process; shares the process's ``Runtime``, and is
    one of its hooks (hands each stored member result on)."""

    def __init__(self, runtime: Runtime, send: Send) -> None:
        self.rt = runtime
        self.redis = runtime.redis
        self.keys = runtime.keys
        self._send = send
        self._done = script(self.redis, "ensemble_done")
        self._ttl_s = runtime.settings.result_ttl_s
        self._ensembles: dict[str, EnsembleSpec] = {}

    def _done_key(self, job_id: str, stage: int, chunk: int) -> str:
        return self.keys.stage(job_id, stage, chunk)

    # -- after a member result is stored -------------------------------------------

    def after_store(self, finished: Finished) -> None:
        for env, _ in finished:
            self.on_stored(env)

    def on_stored(self, env: TaskEnvelope) -> None:
        """Runtime hook: every item of ``env`` has a stored result (new or from before)."""
        if env.then is None:
            return
        try:
            cont = Continuation.from_dict(env.then)
        except PayloadError as exc:
            log.error("member task %s carries a bad continuation: %s", env.describe(), exc)
            self._refuse(env.then, exc)
            return
        for item in env.items:
            key = self._done_key(cont.job_id, cont.stage, cont.chunk)
            if self._done(keys=[key], args=[item.job_id, len(cont.slots), self._ttl_s * 1000]):
                # The member's trace goes on: the fusion task's span links the job's submit.
                body = replace(cont, trace=env.trace).to_dict() if env.trace else cont.to_dict()
                self._send(FUSE_TASK_NAME, FUSION_QUEUE, body, cont.priority)

    # -- the fusion task -------------------------------------------------------------

    def handle(self, body: Any) -> dict[str, Any]:
        """Fuse one chunk's stage: store the result, or publish the next stage."""
        try:
            cont = Continuation.from_dict(body)
        except PayloadError as exc:
            log.error("dropped a fusion task: %s", exc)
            self._refuse(body, exc)
            return {"error": str(exc)}
        # Linked to the job's submit span (its trace came with the member's task).
        with tracing.batch_span("hetbatch.fuse", (cont.trace,), {"hetbatch.ensemble": cont.ensemble}):
            return self._fuse(cont)

    def _refuse(self, data: Any, exc: PayloadError) -> None:
        """Store a refused continuation's error as the result of the ensemble job chunk it
        still names (``refused_job``): its producer gets a typed error, not a wait in vain."""
        named = refused_job(data)
        if named is not None:
            job_id, chunk, reply_to = named
            self.rt.writer.write([Outcome(job_id, chunk, encode_error(RemoteError.from_exception(exc)))], reply_to)

    def _fuse(self, cont: Continuation) -> dict[str, Any]:
        if self.redis.exists(self.keys.result(cont.job_id, cont.chunk)):
            return {"ensemble": cont.ensemble, "duplicate": 1}
        spec: EnsembleSpec | None = None
        try:
            spec = self._spec(cont.ensemble)
            members = self._members(spec, cont)
            if cont.stage < spec.final_stage:
                return self._next_stage(spec, cont, members)
            outcome = Outcome(cont.job_id, cont.chunk, encode_result(self._result(spec, cont, members)))
        except (redis.ConnectionError, redis.TimeoutError):
            raise  # not the job's fault: fail the task, keep the job pending
        except Exception as exc:  # the members' outputs do not fit the strategy, or a stored value is not ours
            error = RemoteError.from_exception(library_error(exc, ConfigError))
            outcome = Outcome(cont.job_id, cont.chunk, encode_error(error))
        with tracing.child_span("hetbatch.store", {"hetbatch.tasks": 1}):
            self.rt.writer.write([outcome], cont.reply_to)
        self._cleanup(spec, cont)
        return {"ensemble": cont.ensemble, "chunk": cont.chunk, "failed": int(outcome.result[:1] == b"E")}

    def _spec(self, ref: str) -> EnsembleSpec:
        spec = self._ensembles.get(ref)
        if spec is None:
            spec = cast(EnsembleSpec, self.rt.registry.get(ref))
            self._ensembles[ref] = spec
        return spec

    def _whole(self, job_id: str, chunk: int, data: bytes | None) -> bytes | None:
        """A member's stored result, read back whole when it is stored in parts."""
        if not parts.is_manifest(data):
            return data
        assert data is not None
        got = {chunk: data}

        def mget(step: Step) -> Any:
            assert isinstance(step, Mget)  # join_steps only reads
            return self.redis.mget(step.keys)

        run(join_steps(self.keys, job_id, job_id, got), mget)
        return got[chunk]

    def _members(self, spec: EnsembleSpec, cont: Continuation) -> list[MemberOutput]:
        """The stage's member outputs; raises when too few succeeded.

        Raises:
            MemberFailed: a member failed and the quorum (``min_members``) is not met.
            JobExpired: every failed member failed because the deadline passed.
        """
        ids = [member_job_id(cont.job_id, cont.stage, slot) for slot in cont.slots]
        stored = cast(list[bytes | None], self.redis.mget([self.keys.result(i, cont.chunk) for i in ids]))
        stored = [self._whole(i, cont.chunk, data) for i, data in zip(ids, stored, strict=True)]
        ok: list[MemberOutput] = []
        failed: list[tuple[str, RemoteError]] = []
        for slot, data in zip(cont.slots, stored):
            ref = spec.slot_ref(slot)
            decoded = decode_result(data) if data is not None else RemoteError("JobLost", "member result is gone")
            if isinstance(decoded, RemoteError):
                failed.append((ref, decoded))
            else:
                ok.append(self._member_output(spec, slot, decoded))
        need = spec.required if spec.strategy in _PARALLEL else len(cont.slots)
        if len(ok) >= need:
            return ok
        if all(err.type == "JobExpired" for _, err in failed):
            raise JobExpired(cont.job_id, failed[0][1].message)
        ref, err = failed[0]
        others = f"; also failed: {', '.join(r for r, _ in failed[1:])}" if len(failed) > 1 else ""
        raise MemberFailed(ref, err, f" ({len(ok)} of {len(cont.slots)} succeeded, {need} needed{others})")

    def _member_output(self, spec: EnsembleSpec, slot: int, table: pa.Table) -> MemberOutput:
        ref = spec.slot_ref(slot)
        arrays = result_arrays(table)
        member = spec.members[slot] if slot < len(spec.members) else None
        use = member.output if member is not None and member.output else next(iter(arrays))
        weight = member.weight if member is not None and member.weight is not None else 1.0
        return MemberOutput(ref, arrays, use, weight, self.rt.models.spec(ref).classes, slot)

    def _params(self, spec: EnsembleSpec, cont: Continuation) -> dict[str, Any]:
        params = dict(spec.params, rows=cont.rows)
        if spec.classes is not None:
            params["classes"] = list(spec.classes)
        if spec.strategy == "select" and "rule" in spec.params:
            params["route"] = route_rows(spec, self._stage_input(cont, 0))
        return params

    def _stage_input(self, cont: Continuation, stage: int) -> pa.Table:
        key = stage_input_key(self.keys, cont.job_id, stage, cont.chunk)
        data = cast(bytes | None, self.redis.get(key))
        if data is None:
            raise JobLost(cont.job_id, f"ensemble input {key} is gone (TTL passed or Redis lost it)")
        return decode_table(data)

    def _result(self, spec: EnsembleSpec, cont: Continuation, members: list[MemberOutput]) -> pa.Table:
        params = self._params(spec, cont)
        if spec.strategy in ("stack", "chain"):
            arrays = dict(members[0].outputs)  # the meta-model's / the last link's outputs
        else:
            arrays = fuse(spec.strategy, members, params)
        if spec.include_members:
            arrays.update(self._raw(spec, cont, members, params))
        return arrays_to_table(arrays)

    def _raw(
        self, spec: EnsembleSpec, cont: Continuation, members: list[MemberOutput], params: Mapping[str, Any]
    ) -> dict[str, np.ndarray]:
        """Members' own outputs as ``<member>.<output>`` columns (select: a ``member`` column)."""
        if spec.strategy == "select":
            names = np.asarray([m.ref for m in spec.members], dtype=object)
            route = params.get("route")
            return {"member": names[route if route is not None else np.full(cont.rows, spec.choice)]}
        earlier = [
            m
            for stage in range(spec.final_stage)
            for m in self._members(spec, replace(cont, stage=stage, slots=spec.slots(stage)))
        ]
        everyone = earlier + (members if spec.final_stage == 0 else [])
        return {f"{parse_ref(m.name)[0]}.{col}": v for m in everyone for col, v in m.outputs.items()}

    def _next_stage(self, spec: EnsembleSpec, cont: Continuation, members: list[MemberOutput]) -> dict[str, Any]:
        stage = cont.stage + 1
        model = self.rt.models.spec(spec.slot_ref(spec.slots(stage)[0]))
        if spec.strategy == "stack":
            arrays = {model.inputs[0].name: fuse("stack", members, {"rows": cont.rows})["features"]}
        else:
            arrays = fuse("chain", members, {"map": spec.params["maps"][cont.stage], "rows": cont.rows})
        plan = plan_stage(
            spec,
            job_id=cont.job_id,
            chunk=cont.chunk,
            stage=stage,
            table=to_table(arrays, model.inputs, cast="same_kind"),
            models=self.rt.models.spec,
            keys=self.keys,
            reply_to=cont.reply_to,
            deadline=cont.deadline,
            priority=cont.priority,
        )
        pipe = self.redis.pipeline(transaction=False)
        for key, blob in plan.blobs.items():
            pipe.set(key, blob, ex=self._ttl_s)
        pipe.execute()
        for queue, env in plan.tasks:
            traced = replace(env, trace=cont.trace) if cont.trace else env
            self._send(TASK_NAME, queue, traced.to_dict(), cont.priority)
        return {"ensemble": cont.ensemble, "chunk": cont.chunk, "stage": stage}

    def _cleanup(self, spec: EnsembleSpec | None, cont: Continuation) -> None:
        """Drop the job's intermediate keys once its fused result (or error) is stored."""
        # Without the spec (unknown ensemble) only what the continuation itself names goes.
        stages = range(spec.final_stage + 1) if spec is not None else (cont.stage,)
        slots = range(len(spec.members) + 1) if spec is not None else cont.slots
        doomed = []
        for stage in stages:
            doomed += [stage_input_key(self.keys, cont.job_id, stage, cont.chunk)]
            doomed += [self._done_key(cont.job_id, stage, cont.chunk)]
            for slot in slots:
                item = member_job_id(cont.job_id, stage, slot)
                doomed += [self.keys.input(item, cont.chunk), self.keys.result(item, cont.chunk)]
        self.redis.delete(*doomed)
