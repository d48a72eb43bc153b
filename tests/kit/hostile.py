"""Hostile queue entries over every layer a worker decodes (tests/e2e/test_hostile_queue.py).

Layers, outermost first (SECURITY.md's threat model): the Redis list entry, the kombu
frame, the Celery body, the envelope's fields, the payload reference (inline, Redis key,
shared-memory file) and the Arrow bytes. ``Hostile.entries`` builds a reproducible mix
(one seed) of random bytes, truncated and bit-flipped real frames (built by
``celery_message``, as producers build them), wrong body shapes, every envelope field
missing, of a wrong type, huge or another job's value, key names of other jobs and of
the registry, and shared-memory names that are FIFOs, folders, links, devices or other
jobs' files; and well-formed jobs among them, whose results must equal in-process.

An entry *names* a job when a worker can read its envelope: then that job must be
answered (``units``: its result keys). Entries broken before the envelope name none.
"""

from __future__ import annotations

import base64
import json
import os
import random
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis

from hetbatch.producers.protocol import shm
from hetbatch.producers.protocol.keys import Keys, lane_list
from hetbatch.producers.protocol.kombu import celery_message, priority_list
from hetbatch.producers.protocol.schema import arrays_to_table
from hetbatch.producers.protocol.wire import TASK_NAME, Item, TaskEnvelope, encode_table
from tests.kit.hostile_files import key_traps, shm_traps

__all__ = ["Entry", "Hostile", "Scene"]

FIELDS = ("v", "model", "version", "items", "sizes", "payload_key", "payload_b64", "payload_shm")
FIELDS += ("reply_to", "deadline", "then", "pack", "trace")
# Wrong types for any field; "huge" values are added per field (a few, they are big).
WRONG = (None, 0, -1, 1.5, True, False, "", "x", [], {}, [1], {"a": 1}, 2**70, -(2**63), "NaN", [[]])
BUILTIN_TASKS = ("celery.chord_unlock", "celery.group", "celery.chain", "celery.map", "celery.starmap")
BUILTIN_TASKS += ("celery.chunks", "celery.backend_cleanup", "celery.accumulate", "celery.chord", "no.such.task")


@dataclass(frozen=True, eq=False)  # each entry is itself: hashed by identity
class Entry:
    """One entry to push onto a list a worker consumes."""

    target: str
    raw: bytes
    layer: str
    kind: str
    units: tuple[str, ...] = ()  # result keys of the job it names; () when it names none
    good: np.ndarray | None = None  # a well-formed job's rows: its result must equal in-process


@dataclass
class Scene:
    """What the generator needs to know about the deployment under attack."""

    r: redis.Redis
    keys: Keys
    queue: str
    host: str  # the queue's host queue (shared-memory payloads)
    folder: Path  # the shared-memory folder the worker reads
    model: str
    version: str
    X: np.ndarray  # rows the model accepts (float64, 4 features)
    victim_keys: list[str] = field(default_factory=list)  # keys of other jobs and of the registry
    victim_files: list[str] = field(default_factory=list)  # other jobs' shared-memory file names
    max_payload_bytes: int = 16 << 20


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Hostile:
    """Builds hostile entries (and the keys and files some of them point at) for one scene."""

    def __init__(self, scene: Scene, seed: int) -> None:
        self.s = scene
        self.rng = random.Random(seed)
        self.np = np.random.default_rng(seed)
        self.lane = lane_list(scene.queue)
        self.out: list[Entry] = []

    # -- building blocks ------------------------------------------------------

    def rows(self, n: int | None = None) -> np.ndarray:
        n = n or self.rng.randint(1, 6)
        return np.ascontiguousarray(self.s.X[self.np.integers(0, len(self.s.X), n)])

    @staticmethod
    def arrow(x: np.ndarray, name: str = "X") -> bytes:
        return bytes(encode_table(arrays_to_table({name: x})))

    def env(self, job: str, x: np.ndarray, **payload: Any) -> dict[str, Any]:
        """A well-formed envelope of ``job`` (inline payload unless one is given)."""
        if not payload:
            payload = {"payload_b64": _b64(self.arrow(x))}
        return TaskEnvelope(self.s.model, self.s.version, (Item(job, 0, len(x)),), **payload).to_dict()

    def frame(self, body: Any, job: str, target: str | None = None, priority: int = 0) -> bytes:
        """A real kombu frame carrying ``body`` as the predict task's one argument."""
        return celery_message(TASK_NAME, [body], target or self.s.queue, priority, f"hostile {job}", f"{job}.0")

    def unit(self, job: str) -> tuple[str, ...]:
        return (self.s.keys.result(job, 0),)  # where the job's (chunk 0) answer is stored

    def add(self, target: str, raw: bytes, layer: str, kind: str, units: tuple[str, ...] = (), **kw: Any) -> None:
        self.out.append(Entry(target, raw, layer, kind, units, **kw))

    def target(self) -> tuple[str, int]:
        """A list of the queue and its priority (kombu reads ``<queue>:<n>`` too)."""
        priority = self.rng.choice((0, 0, 0, 3, 5, 9))
        return priority_list(self.s.queue, priority), priority

    # -- layers ---------------------------------------------------------------

    def good(self, n: int) -> None:
        """Well-formed jobs over every transport and list: they must still get their answers."""
        for i in range(n):
            job, x = uuid.uuid4().hex, self.rows()
            how = i % 4
            if how == 0:
                lst, prio = self.target()
                self.add(
                    lst, self.frame(self.env(job, x), job, priority=prio), "good", "inline", self.unit(job), good=x
                )
            elif how == 1:
                key = self.s.keys.input(job, 0)
                self.s.r.set(key, self.arrow(x), ex=3600)
                body = self.env(job, x, payload_key=key)
                self.add(self.s.queue, self.frame(body, job), "good", "key", self.unit(job), good=x)
            elif how == 2:
                name = shm.payload_name(job, 0)
                shm.write_payload(str(self.s.folder), name, self.arrow(x))
                body = self.env(job, x, payload_shm=name)
                self.add(self.s.host, self.frame(body, job, self.s.host), "good", "shm", self.unit(job), good=x)
            else:
                self.add(self.lane, json.dumps(self.env(job, x)).encode(), "good", "lane", self.unit(job), good=x)

    def list_entries(self, n: int) -> None:
        """Redis list entries that are no frame at all."""
        fixed = [b"", b"garbage", b"null", b"1", b'"text"', b"[1,2]", b'{"x":1}', b"{}", b"[]", b"\x00" * 64]
        fixed += ["ünïcode".encode("utf-16"), b"\xff\xfe\xfd"]
        for i in range(n):
            raw = fixed[i] if i < len(fixed) else self.rng.randbytes(self.rng.choice((1, 7, 64, 512, 4096)))
            for lst in (self.target()[0], self.lane, self.s.host):
                self.add(lst, raw, "list", "bytes")
        for raw in (b"{" * 50_000, b"[" * 100_000):  # JSON decoders recurse: RecursionError, not ValueError
            for lst in (self.s.queue, self.lane, self.s.host):
                self.add(lst, raw, "list", "deep-json")
        self.add(self.s.queue, self.rng.randbytes(2 << 20), "list", "2MiB-bytes")

    def frames(self, n: int) -> None:
        """Real frames, cut short, bit-flipped, or with a field of the frame set wrong."""
        for _ in range(n):
            job, x = uuid.uuid4().hex, self.rows()
            lst, prio = self.target()
            raw = self.frame(self.env(job, x), job, priority=prio)
            how = self.rng.random()
            if how < 0.35:
                self.add(lst, raw[: self.rng.randrange(len(raw))], "frame", "truncated")
            elif how < 0.7:
                flipped = bytearray(raw)
                for _ in range(self.rng.randint(1, 8)):
                    flipped[self.rng.randrange(len(flipped))] ^= 1 << self.rng.randrange(8)
                self.add(lst, bytes(flipped), "frame", "bit-flipped")
            else:
                self.add(lst, self._frame_field(json.loads(raw)), "frame", "field")

    def _frame_field(self, msg: dict[str, Any]) -> bytes:
        where = self.rng.choice(("top", "headers", "properties", "delivery_info"))
        box = {"top": msg, "headers": msg["headers"], "properties": msg["properties"]}.get(where)
        if box is None:
            box = msg["properties"]["delivery_info"]
        name = self.rng.choice(sorted(box))
        choice = self.rng.random()
        if choice < 0.25:
            del box[name]
        elif choice < 0.85:
            box[name] = self.rng.choice(WRONG)
        else:
            box[name] = self.rng.choice(
                (
                    "A" * 1_000_000,
                    "application/x-python-serialize",
                    "application/x-yaml",
                    "application/x-msgpack",
                    "text/plain",
                    "binary",
                    "2999-01-01T00:00:00",
                    "not-a-date",
                    "rot13",
                    *BUILTIN_TASKS,
                )
            )
        return json.dumps(msg).encode()

    def frame_specials(self) -> None:
        """Frames hand-made for one trap each: pickle, other serializers, compression, ETAs, built-in tasks."""
        job, x = uuid.uuid4().hex, self.rows()
        base = json.loads(self.frame(self.env(job, x), job))

        def variant(kind: str, **changes: Any) -> None:
            msg = json.loads(json.dumps(base))
            for path, value in changes.items():
                box = msg
                *parents, last = path.split("__")
                for p in parents:
                    box = box[p]
                box[last] = value
            self.add(self.s.queue, json.dumps(msg).encode(), "frame", kind)

        variant("pickle", **{"content-type": "application/x-python-serialize", "body": _b64(b"\x80\x04K\x01.")})
        variant("yaml", **{"content-type": "application/x-yaml", "body": _b64(b"!!python/object:os.system [id]")})
        variant("msgpack", **{"content-type": "application/x-msgpack", "body": _b64(b"\x93\x90\x80\x80")})
        variant("gzip-garbage", headers__compression="application/x-gzip", body=_b64(b"not gzip"))
        bomb = zlib.compress(b"\x00" * (64 << 20), 9)  # 64 MiB of zeros in ~64 KiB
        variant("zlib-bomb", headers__compression="application/x-gzip", body=_b64(bomb))
        variant("bz2-garbage", headers__compression="application/x-bz2", body=_b64(b"BZh9garbage"))
        variant("eta-far", headers__eta="2999-01-01T00:00:00+00:00")
        variant("eta-garbage", headers__eta="not-a-date")
        variant("expires-garbage", headers__expires="soon")
        variant("expired", headers__expires="2000-01-01T00:00:00+00:00")
        variant("countdown-timelimit", headers__timelimit=[-1, "x"])
        variant("retries-huge", headers__retries=2**70)
        for name in BUILTIN_TASKS:
            variant(f"task={name}", headers__task=name)
        variant("no-delivery-tag", properties__delivery_tag=None)
        variant("encoding-latin", **{"content-encoding": "latin-1"})
        variant("body-encoding-none", properties__body_encoding=None, body=json.dumps([[], {}, {}]))

    def bodies(self, n: int) -> None:
        """Frames intact, Celery body of every wrong shape."""
        job, x = uuid.uuid4().hex, self.rows()
        env = self.env(job, x)
        embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
        sig = {"task": TASK_NAME, "args": [env], "kwargs": {}, "options": {}, "subtask_type": None}
        shapes: list[Any] = [
            {"x": 1},
            [1, 2],
            [],
            None,
            "text",
            [[], {}, {}],
            [[env, env], {}, embed],
            [[], {"bogus": 1}, embed],
            [[env], [], embed],
            [[env], {}, []],
            [[env], {}, {"callbacks": "x"}],
            [[env], {}, {"chain": [{"garbage": 1}]}],
            [[env], {}, {"chord": {"task": 1}}],
            [[env], {}, {"errbacks": [sig]}],
            [[env], {"extra": 1}, embed],
            [[env], {}, embed, "fourth"],
        ]
        raws: list[bytes] = [b"!!! not base64 !!!", b"", self.rng.randbytes(300), b"[" * 100_000]
        for i in range(n):
            if i < len(shapes):
                body = _b64(json.dumps(shapes[i]).encode())
            elif i - len(shapes) < len(raws):
                raw = raws[i - len(shapes)]
                body = raw.decode("latin-1") if i % 2 else _b64(raw)
            else:
                body = _b64(self.rng.randbytes(self.rng.randint(1, 400)))
            msg = json.loads(self.frame(env, job))
            msg["body"] = body
            deep = body.startswith("[[[") or body == _b64(b"[" * 100_000)
            embed_set = i < len(shapes) and isinstance(shapes[i], list) and len(shapes[i]) > 2 and shapes[i][2] != embed
            kind = "deep-json" if deep else "embed" if embed_set else "shape"  # embed: Celery's callbacks, chain, chord
            self.add(self.target()[0], json.dumps(msg).encode(), "body", kind)

    def envelopes(self, n: int) -> None:
        """Frames and lane entries whose envelope has one field missing, of a wrong type, huge or another's."""
        victims = self.s.victim_keys + self.s.victim_files + [self.s.keys.models()]
        for i in range(n):
            job, x = uuid.uuid4().hex, self.rows()
            body = self.env(job, x)
            name = FIELDS[i % len(FIELDS)]
            choice = self.rng.random()
            if choice < 0.15:
                body.pop(name, None)
                kind = f"{name}:missing"
            elif choice < 0.75:
                body[name] = self.rng.choice(WRONG)
                kind = f"{name}:wrong-type"
            elif choice < 0.8:
                big = self.rng.random() < 0.1  # a few of 2 MB, most of 200 kB: the run stays short
                body[name] = self.rng.choice(
                    (
                        "H" * (2_000_000 if big else 200_000),
                        [[job, 0, 1]] * (50_000 if big else 5_000),
                        list(range(20_000)),
                    )
                )
                kind = f"{name}:huge"
            else:
                body[name] = self.rng.choice(victims)
                kind = f"{name}:another's"
            units = self._units(body, job, name)
            if i % 3 == 2:
                self.add(self.lane, json.dumps(body).encode(), "envelope", kind, units)
            else:
                lst, prio = self.target()
                self.add(lst, self.frame(body, job, priority=prio), "envelope", kind, units)
        for value in ("not-a-pack", "", self.s.victim_keys[0].rsplit(":", 2)[-2], "x" * 300):  # pack hangs
            job, x = uuid.uuid4().hex, self.rows()
            body = {**self.env(job, x), "pack": value}
            self.add(self.s.queue, self.frame(body, job), "envelope", "pack:foreign", self._units(body, job, "pack"))

    def _units(self, body: dict[str, Any], job: str, changed: str) -> tuple[str, ...]:
        """Result keys that answer the job an envelope names (() when its items do not parse)."""
        if changed in ("items", "sizes"):
            return ()
        units = self.unit(job)
        pack = body.get("pack")
        if changed == "pack" and isinstance(pack, str) and pack:
            units += (self.s.keys.result(pack, 0),)
        return units

    def references(self, rounds: int) -> None:
        """Payload references naming what is not the job's own: keys, files, FIFOs, folders, links, devices."""
        k, folder = self.s.keys, self.s.folder
        foreign_keys = [*self.s.victim_keys, k.models(), k.model(self.s.model), self.s.queue, self.lane, "unacked"]
        foreign_keys += ["unacked_index", f"_kombu.binding.{self.s.queue}", f"{k.prefix}:in:*", "", "no-such-key"]
        foreign_keys += [k.dlq(), k.ledger(), f"{k.prefix}:canary:hash", f"{k.prefix}:canary:str", "canary:stream"]
        for round_ in range(rounds):
            for key in foreign_keys:
                job, x = uuid.uuid4().hex, self.rows()
                body = self.env(job, x, payload_key=key)
                self.add(self.s.queue, self.frame(body, job), "reference", "key:foreign", self.unit(job))
            for name in [*self.s.victim_files, "../../etc/passwd", "/etc/passwd", "hetbatch-host", ".", ""]:
                job, x = uuid.uuid4().hex, self.rows()
                body = self.env(job, x, payload_shm=name)
                self.add(self.s.host, self.frame(body, job, self.s.host), "reference", "shm:foreign", self.unit(job))
            for reply in (k.models(), self.s.victim_keys[0], self.s.queue, "unacked"):
                job, x = uuid.uuid4().hex, self.rows()
                body = {**self.env(job, x), "reply_to": reply}
                self.add(self.s.queue, self.frame(body, job), "reference", "reply:foreign", self.unit(job))
            for kind, setup in key_traps(self.s.r, self.s.max_payload_bytes, self.rng, huge=round_ == 0).items():
                job, x = uuid.uuid4().hex, self.rows()
                setup(k.input(job, 0), x)
                body = self.env(job, x, payload_key=k.input(job, 0))
                self.add(self.s.queue, self.frame(body, job), "reference", f"key:{kind}", self.unit(job))
            for kind, make in shm_traps(self.s.folder, self.s.victim_files, self.rng).items():
                job, x = uuid.uuid4().hex, self.rows()
                name = shm.payload_name(job, 0)
                make(folder / name, x)
                body = self.env(job, x, payload_shm=name)
                self.add(self.s.host, self.frame(body, job, self.s.host), "reference", f"shm:{kind}", self.unit(job))
            over = [_b64(b"x" * (self.s.max_payload_bytes + 1))] if round_ == 0 else []
            for b64 in ("!!!", "A" * 5, *over):
                job, x = uuid.uuid4().hex, self.rows()
                body = self.env(job, x, payload_b64=b64)
                self.add(self.s.queue, self.frame(body, job), "reference", "inline:bad", self.unit(job))

    def arrow_bytes(self, n: int) -> None:
        """Envelopes intact, Arrow payload random, cut, bit-flipped, of the wrong schema or row count."""
        for i in range(n):
            job, x = uuid.uuid4().hex, self.rows()
            good = self.arrow(x)
            how = i % 6
            if how == 0:
                blob = self.rng.randbytes(self.rng.randint(1, 600))
            elif how == 1:
                blob = good[: self.rng.randrange(len(good))]
            elif how == 2:
                flipped = bytearray(good)
                flipped[self.rng.randrange(len(flipped))] ^= 1 << self.rng.randrange(8)
                blob = bytes(flipped)
            elif how == 3:
                blob = self.arrow(x, name="Y")
            elif how == 4:
                blob = self.arrow(x.astype(np.int64))
            else:
                blob = self.arrow(self.rows(len(x) + 3))
            body = self.env(job, x, payload_b64=_b64(blob))
            self.add(self.target()[0], self.frame(body, job), "arrow", f"arrow:{how}", self.unit(job))

    def entries(self, total: int = 3000) -> list[Entry]:
        """The whole mix, shuffled (same seed, same entries)."""
        self.good(total // 25)
        self.list_entries(total // 30)
        self.frame_specials()
        self.bodies(total // 12)
        self.references(max(2, total // 400))
        self.arrow_bytes(total // 12)
        left = total - len(self.out)
        self.frames(max(0, left * 2 // 5))
        self.envelopes(max(0, total - len(self.out)))
        self.rng.shuffle(self.out)
        # Debugging aid: leave out kinds ("layer/kind" substrings) while a known killer is fixed.
        skip = [s for s in os.environ.get("HETBATCH_HOSTILE_SKIP", "").split(",") if s]
        return [e for e in self.out if not any(s in f"{e.layer}/{e.kind}" for s in skip)]
