"""Every Redis key name hetbatch builds, in one place.

All keys live under one prefix (``DEFAULT_PREFIX`` unless a deployment sets
``prefix``), so several deployments can share one Redis. Layout, prefix ``p``::

    jobs          p:in:<job>:<chunk>       string  a chunk's input rows (Arrow IPC), TTL input_ttl_s
                  p:res:<job>:<chunk>      string  a chunk's stored result (or its manifest of parts), TTL result_ttl_s
                  p:res:<job>:<chunk>:<i>  string  part i of a result stored in parts (producers.protocol.parts)
                  p:res:<job>:<chunk>:stage:<w>  string  a big value being stored (worker.results), renamed at once
                  p:job:<job>              string  a job's record (model, chunks, rows)
                  p:gone:<job>             string  tombstone of a deleted or purged job ("deleted"/"purged")
                  p:reply:<client>         list    a producer's reply notices
    registry      p:models                 hash    name -> latest version
                  p:model:<name>           hash    version -> entry JSON (and p:model:<name>:seq)
    ledger        p:task:<task>            hash    a published task (see producers.protocol.ledger)
                  p:ledger                 zset    task -> when to look at it next
                  p:att:<job>              hash    attempts per chunk
                  p:dlq                    list    dead-lettered task ids, newest first
                  p:reliability            hash    reliability counters
                  p:reconciler:leader      string  the reconciler leader's lock
    workers       p:worker:<node>          string  a worker's heartbeat JSON
                  p:alive:<queue>          string  fresh while a worker consumes <queue> (or its lane)
                  p:stats:<name@version>   hash    batch statistics of a model
                  p:ens:<job>:<stage>:<c>  set     an ensemble stage's finished members
    lane          p:lane:held              hash    held list -> until when (unix ms) it is vouched for
                  p:lane:held:<w>:<slot>   list    envelopes a worker's lane slot is running

Queue lists are named after the queue, without the prefix (Celery's convention): kombu's
priority lists (``producers.protocol.kombu``) and the lane list ``<queue>:lane`` below.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["DEFAULT_PREFIX", "LANE_SUFFIX", "Keys", "is_reply", "lane_list"]

DEFAULT_PREFIX = "hb"
LANE_SUFFIX = "lane"


def lane_list(queue: str) -> str:
    """The Redis list of ``queue``'s lane: bare task envelopes (JSON), no Celery frame.

    Workers drain it many envelopes at a time (``worker.lane``), which spares small jobs
    Celery's per-message cost; the ledger covers its jobs as it covers Celery's. Named
    like kombu's priority lists (``<queue>:<n>``) so that one ``<queue>*`` pattern finds
    every list of a queue.
    """
    return f"{queue}:{LANE_SUFFIX}"


_REPLY = ":reply:"
_CLIENT_ID = re.compile(r"[A-Za-z0-9_.@~-]{1,128}")


def is_reply(name: str) -> bool:
    """Whether ``name`` has the shape of a producer's reply list (``Keys.reply``) under any
    prefix: a worker pushes notices only onto such a list, never onto a key an envelope names."""
    prefix, sep, client = name.rpartition(_REPLY)
    return bool(sep and prefix and _CLIENT_ID.fullmatch(client))


JOB_KEY_KINDS = {
    "job": "records",
    "in": "inputs",
    "res": "results",
    "task": "ledger",
    "att": "attempts",
    "gone": "tombstones",
}
"""The kinds of keys a job owns (the segment after the prefix -> the name ``hetbatch status`` shows)."""


@dataclass(frozen=True)
class Keys:
    """Redis key names of one deployment (see the module docstring for the layout)."""

    prefix: str = DEFAULT_PREFIX

    def everything(self) -> str:
        """A SCAN pattern matching every key of the deployment."""
        return f"{self.prefix}:*"

    def job_key_kind(self, name: str) -> str | None:
        """The kind of job-owned key ``name`` is (``JOB_KEY_KINDS``' names), or None."""
        head, sep, rest = name.partition(":")
        return JOB_KEY_KINDS.get(rest.split(":", 1)[0]) if sep and head == self.prefix else None

    # -- jobs ------------------------------------------------------------------

    def input(self, job_id: str, chunk: int) -> str:
        return f"{self.prefix}:in:{job_id}:{chunk}"

    def result(self, job_id: str, chunk: int) -> str:
        return f"{self.prefix}:res:{job_id}:{chunk}"

    def result_part(self, job_id: str, chunk: int, part: int) -> str:
        """Part ``part`` of a chunk's result stored in parts (``producers.protocol.parts``)."""
        return f"{self.prefix}:res:{job_id}:{chunk}:{part}"

    def result_stage(self, job_id: str, chunk: int, write: str) -> str:
        """Where write ``write`` (a random token) stages a big value of the chunk's result
        before the store script renames it into place (``lua/results_store.lua``)."""
        return f"{self.prefix}:res:{job_id}:{chunk}:stage:{write}"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def gone(self, job_id: str) -> str:
        """Tombstone of a deleted or purged job (``job_id``: its unit, a pack's id for a pack):
        while it lives no worker runs the job and no result of it is stored."""
        return f"{self.prefix}:gone:{job_id}"

    def reply(self, client_id: str) -> str:
        return f"{self.prefix}{_REPLY}{client_id}"

    # -- registry --------------------------------------------------------------

    def models(self) -> str:
        return f"{self.prefix}:models"

    def model(self, name: str) -> str:
        return f"{self.prefix}:model:{name}"

    def model_seq(self, name: str) -> str:
        """Counter of the versions assigned to ``name``."""
        return f"{self.model(name)}:seq"

    # -- ledger ----------------------------------------------------------------

    def task(self, task_id: str) -> str:
        return f"{self.prefix}:task:{task_id}"

    def ledger(self) -> str:
        return f"{self.prefix}:ledger"

    def attempts(self, job_id: str) -> str:
        return f"{self.prefix}:att:{job_id}"

    def dlq(self) -> str:
        return f"{self.prefix}:dlq"

    def reliability(self) -> str:
        return f"{self.prefix}:reliability"

    def leader(self) -> str:
        return f"{self.prefix}:reconciler:leader"

    # -- workers ---------------------------------------------------------------

    def worker(self, name: str) -> str:
        """A worker's heartbeat record (``name``: its Celery node name, or ``*`` to match all)."""
        return f"{self.prefix}:worker:{name}"

    def alive(self, queue: str) -> str:
        """Refreshed with a TTL by every worker consuming ``queue`` (worker.ops.status);
        ``alive(lane_list(q))`` by every worker draining ``q``'s lane."""
        return f"{self.prefix}:alive:{queue}"

    def batch_stats(self, ref: str) -> str:
        """Batch statistics of the model ``ref`` (``name@version``)."""
        return f"{self.prefix}:stats:{ref}"

    def stage(self, job_id: str, stage: int, chunk: int) -> str:
        """The set of members of an ensemble job's stage that finished ``chunk``."""
        return f"{self.prefix}:ens:{job_id}:{stage}:{chunk}"

    # -- lane ------------------------------------------------------------------

    def held(self, worker: str, slot: int) -> str:
        """The list holding the envelopes a worker's lane slot is running."""
        return f"{self.prefix}:lane:held:{worker}:{slot}"

    def held_index(self) -> str:
        """Hash: held list -> until when (unix ms) its worker vouches for it. The reconciler
        reads it instead of scanning for held lists (SCAN is not among the ACL's commands)."""
        return f"{self.prefix}:lane:held"
