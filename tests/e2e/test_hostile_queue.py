"""A hostile queue: thousands of entries over every layer, pushed straight onto the lists a
real worker consumes (its queue and priority lists, its host queue, its lane).

What must hold (issue 16): the worker never exits (same pid); every job an entry names
is answered within 5 s or dead-lettered; no key of another job or of the registry is
read, changed or deleted (a snapshot of their values, and their idle times, before and
after), nor another job's shared-memory file; every error result carries one of the
library's error types; the worker's memory stays within a bound; and afterwards the
other jobs, held back during the attack, and new jobs all equal the model in-process.

``HETBATCH_HOSTILE_SEED`` and ``HETBATCH_HOSTILE_ENTRIES`` reproduce or resize a run.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import redis

from hetbatch.producers import Client, ClientSettings, errors
from hetbatch.producers.protocol import shm
from hetbatch.producers.protocol.keys import Keys, lane_list
from hetbatch.producers.protocol.wire import decode_result, pack_header
from hetbatch.worker.devtools.redis_server import RedisServer
from tests.kit.helpers import WorkerProcess, column, register
from tests.kit.hostile import Entry, Hostile, Scene
from tests.kit.models import Built, sklearn_model


@pytest.fixture()
def tmp_path(shm_path: Path) -> Path:
    """This module's folders live on tmpfs (see ``shm_path`` in tests/conftest.py)."""
    return shm_path


SEED = int(os.environ.get("HETBATCH_HOSTILE_SEED", "16"))
ENTRIES = int(os.environ.get("HETBATCH_HOSTILE_ENTRIES", "3000"))
QUEUE = "sklearn.cpu"
ANSWER_S = 5.0
# Measured over seeds 1-5 once the worker survives the whole mix: see the module notes
# in the report; the bound leaves room for allocator noise, not for a value read whole.
RSS_GROWTH_BOUND = 150 << 20
MAX_PAYLOAD = 16 << 20
BATCH = 200
_JOB_ID = re.compile(rb"[0-9a-f]{32}")
LIBRARY_ERRORS = {
    name
    for name in errors.__all__
    if isinstance(getattr(errors, name), type) and issubclass(getattr(errors, name), errors.HetbatchError)
} | {"PoisonJob"}  # worker.ops.dlq: the error a dead-lettered job's result carries


def _digest(r: redis.Redis, keys: list[str], folder: Path, files: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {k: r.dump(k) for k in keys}
    for name in files:
        path = folder / name
        st = os.lstat(path) if os.path.lexists(path) else None
        out[name] = None if st is None else (st.st_ino, st.st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def _same(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    return [k for k in before if before[k] != after.get(k)]


def _equal(built: Built, x: np.ndarray, table: Any) -> bool:
    return bool(
        np.array_equal(column(table, "label"), built.model.predict(x))
        and np.allclose(column(table, "probabilities"), built.model.predict_proba(x), atol=1e-6)
    )


def _queue_lists(r: redis.Redis) -> list[str]:
    return sorted(k.decode() for k in r.scan_iter(match=f"{QUEUE}*") if r.type(k) == b"list")


class _Rss:
    """Samples a process's RSS every 0.2 s: start, end and peak (bytes)."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return int(self.proc.memory_info().rss)


def _stored_types(r: redis.Redis, prefix: str) -> collections.Counter[str]:
    """Error types of every stored result (``ok`` for successes)."""
    seen: collections.Counter[str] = collections.Counter()
    for key in r.scan_iter(match=f"{prefix}:res:*", count=1000):
        value = r.get(key)
        if value is None:
            continue
        if value[:1] == b"P":
            for item in pack_header(value):
                seen["ok" if isinstance(item, int) else item.type] += 1
            continue
        decoded = decode_result(value)
        seen[getattr(decoded, "type", "ok")] += 1
    return seen


def _dead_lettered(r: redis.Redis, keys: Keys) -> set[str]:
    """Job ids that dead-letter entries name: ``<job>.<chunk>`` task ids, and the ids found in
    the raw bytes kept for entries that are no envelope (a frame's body decoded too), and the
    ids such an entry's ``jobs`` field lists (read before the raw bytes were cut)."""
    out = set()
    for raw_id in r.lrange(keys.dlq(), 0, -1):
        task_id = raw_id.decode(errors="replace")
        out.add(task_id.split(".")[0])
        raw, jobs = r.hmget(keys.task(task_id), ["raw", "jobs"])
        out.update(json.loads(jobs or b"[]"))
        if not raw:
            continue
        texts = [raw]
        try:
            texts.append(base64.b64decode(json.loads(raw)["body"]))
        except (ValueError, KeyError, TypeError, RecursionError):  # b"[" * 100_000 is kept too
            pass
        for text in texts:
            out.update(m.decode() for m in _JOB_ID.findall(text))
    return out


@pytest.fixture()
def iris(tmp_path: Path) -> Built:
    return sklearn_model(tmp_path / "iris", "hq-iris", "iris")


def test_a_hostile_queue_kills_no_worker_reads_no_foreign_key_and_leaves_good_jobs_right(
    redis_server: RedisServer, iris: Built, tmp_path: Path
) -> None:
    url, keys, folder = redis_server.url, Keys(), tmp_path / "shm"
    folder.mkdir()
    r = redis.Redis.from_url(url)
    token = shm.host_token(str(folder), create=True)
    assert token is not None
    host = shm.host_queue(QUEUE, token)

    # Victims: jobs of other producers, published while no worker runs and held back
    # (their lists renamed) until the attack is over; their keys and files are the targets.
    common = dict(redis_url=url, inline_max_bytes=0, shm_dir=str(folder))
    victims = Client(ClientSettings.from_env(**common, shm_min_bytes=1 << 40), listen=False)
    shm_victims = Client(ClientSettings.from_env(**common, shm_min_bytes=0), listen=False)
    ref = register(victims, iris.directory)
    r.set(keys.alive(host), "test", ex=600)  # the producer sends shm jobs while a host worker "lives"
    held: list[tuple[Any, np.ndarray]] = []
    for i, client in enumerate([victims] * 3 + [shm_victims] * 3):
        x = iris.X[i * 7 : i * 7 + 5]
        held.append((client.submit("hq-iris", x), x))
    r.delete(keys.alive(host))
    for name in _queue_lists(r):
        r.rename(name, f"stash:{name}")
    victim_keys = [k.decode() for k in r.scan_iter(match=f"{keys.prefix}:in:*")]
    victim_keys += [keys.job(j.id) for j, _ in held] + [keys.task(f"{j.id}.0") for j, _ in held]
    victim_files = sorted(p.name for p in folder.iterdir() if p.name.startswith("hetbatch-in-"))
    assert len(victim_keys) == 3 + 12 and len(victim_files) == 3
    r.hset(f"{keys.prefix}:canary:hash", "a", "b")
    r.set(f"{keys.prefix}:canary:str", "canary")
    r.xadd("canary:stream", {"a": "b"})
    canaries = [f"{keys.prefix}:canary:hash", f"{keys.prefix}:canary:str", "canary:stream"]
    watched = victim_keys + canaries
    registry = [keys.models(), keys.model("hq-iris")]
    before = _digest(r, watched + registry, folder, victim_files)

    name, version = ref.split("@")
    scene = Scene(r, keys, QUEUE, host, folder, name, version, iris.X, list(victim_keys), victim_files, MAX_PAYLOAD)
    entries = Hostile(scene, SEED).entries(ENTRIES)
    assert len(entries) >= min(ENTRIES, 3000) or os.environ.get("HETBATCH_HOSTILE_SKIP")
    env = {
        "HETBATCH_SHM_DIR": str(folder),
        "HETBATCH_MAX_PAYLOAD_BYTES": str(MAX_PAYLOAD),
        "HETBATCH_OVERDUE_S": "3600",  # the held-back victims must stay held back
        "CUDA_VISIBLE_DEVICES": "",
    }
    worker = WorkerProcess(url, tmp_path, env=env)
    attack_started = time.monotonic()
    try:
        pid = worker.proc.pid
        warm = [e for e in entries if e.layer == "good"][:4]
        _push(r, warm)
        _wait_answers(r, worker, warm, 120.0)  # the model's first load: ~20 s on a busy 2-core host
        rss = _Rss(pid)
        answered_at: dict[Entry, float] = {}
        hung: list[tuple[int, Entry]] = []
        for start in range(0, len(entries), BATCH):
            batch = entries[start : start + BATCH]
            pushed = time.monotonic()
            _push(r, batch)
            got = _wait_answers(r, worker, batch, ANSWER_S)
            answered_at.update({e: t - pushed for e, t in got.items()})
            hung += [(start // BATCH, e) for e in batch if e.units and e not in got]
            if not worker.alive():
                kinds = collections.Counter(f"{e.layer}/{e.kind}" for e in batch)
                pytest.fail(f"worker exited in batch {start // BATCH} ({dict(kinds)}):\n{worker.output()[-4000:]}")
        drained = _wait_drained(r, 30.0)
        rss_end = rss.stop()
        assert worker.alive() and worker.proc.pid == pid, worker.output()[-4000:]

        dead = _dead_lettered(r, keys)
        hung = [(b, e) for b, e in hung if not any(u.split(":")[2] in dead for u in e.units)]
        late = [(b, e) for b, e in hung if r.exists(*e.units)]  # answered, but after ANSWER_S
        slow = sorted(answered_at.values())
        assert not hung, (
            f"{len(hung)} named jobs not answered in {ANSWER_S} s ({len(late)} of them later), by batch "
            f"{dict(collections.Counter(b for b, _ in hung))}; never: "
            f"{collections.Counter(f'{e.layer}/{e.kind}' for b, e in hung if (b, e) not in late).most_common(20)}; "
            f"late: {collections.Counter(f'{e.layer}/{e.kind}' for _, e in late).most_common(10)}; "
            f"answer p50/p99/max {slow[len(slow) // 2]:.2f}/{slow[int(len(slow) * 0.99)]:.2f}/{slow[-1]:.2f} s"
        )
        assert drained == [], f"entries still queued or unacked 30 s after the last push: {drained}"

        idle = time.monotonic() - attack_started
        touched = [k for k in watched if (r.object("idletime", k) or 0) < idle - 3]
        after = _digest(r, watched + registry, folder, victim_files)
        assert _same(before, after) == [], f"victims changed or deleted: {_same(before, after)}"
        assert touched == [], f"victim keys read during the attack: {touched}"

        types = _stored_types(r, keys.prefix)
        untyped = {t: n for t, n in types.items() if t != "ok" and t not in LIBRARY_ERRORS}
        assert untyped == {}, f"error results of types that are not the library's: {untyped}"

        growth = rss_end - rss.start
        named = sum(1 for e in entries if e.units)
        print(
            f"hostile: {len(entries)} entries, {named} naming jobs: {len(answered_at)} answered in {ANSWER_S} s, "
            f"{r.llen(keys.dlq())} dead-letter entries; "
            f"rss +{growth >> 20} MiB (peak +{(rss.peak - rss.start) >> 20} MiB)"
        )
        assert growth < RSS_GROWTH_BOUND, f"worker RSS grew {growth >> 20} MiB (peak +{(rss.peak - rss.start) >> 20})"

        wrong = [e.kind for e in entries if e.good is not None and not _good_result(r, e, iris)]
        assert wrong == [], f"well-formed jobs among the hostile ones answered wrongly: {collections.Counter(wrong)}"

        # The victims, released now, and new jobs: all equal to the model in-process.
        for name_ in r.scan_iter(match="stash:*"):
            r.rename(name_, name_.decode().removeprefix("stash:"))
        for job, x in held:
            assert _equal(iris, x, job.result(timeout_s=30)), f"victim {job.id} answered wrongly"
        with Client.from_url(url, lane_max_rows=64, shm_dir="") as client:
            fresh = [(client.submit("hq-iris", x), x) for x in (iris.X[:10], iris.X[50:52], iris.X[100:150])]
            many = [iris.X[i : i + 3] for i in range(0, 30, 3)]
            fresh += list(zip(client.submit_many("hq-iris", many), many, strict=True))
            for job, x in fresh:
                assert _equal(iris, x, job.result(timeout_s=30))
        assert worker.alive() and worker.proc.pid == pid
    finally:
        worker.stop()
        victims.close()
        shm_victims.close()


def _push(r: redis.Redis, batch: list[Entry]) -> None:
    pipe = r.pipeline(transaction=False)
    for entry in batch:
        pipe.lpush(entry.target, entry.raw)
    pipe.execute()


def _wait_answers(r: redis.Redis, worker: WorkerProcess, batch: list[Entry], within_s: float) -> dict[Entry, float]:
    """When each named job of ``batch`` was first seen answered (monotonic s), within ``within_s``."""
    named = [e for e in batch if e.units]
    got: dict[Entry, float] = {}
    deadline = time.monotonic() + within_s
    while len(got) < len(named) and time.monotonic() < deadline and worker.alive():
        waiting = [e for e in named if e not in got]
        pipe = r.pipeline(transaction=False)
        for e in waiting:
            pipe.exists(*e.units)
        now = time.monotonic()
        for e, found in zip(waiting, pipe.execute(), strict=True):
            if found:
                got[e] = now
        time.sleep(0.05)
    return got


def _wait_drained(r: redis.Redis, within_s: float) -> list[str]:
    """Lists of the queue (not held back) still holding entries, and ``unacked`` if not empty."""
    deadline = time.monotonic() + within_s
    while True:
        left = [k for k in _queue_lists(r) if r.llen(k)] + [lane_list(QUEUE)] * bool(r.llen(lane_list(QUEUE)))
        left += [f"unacked: {v[:300]!r}" for v in r.hvals("unacked")]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def _good_result(r: redis.Redis, entry: Entry, built: Built) -> bool:
    value = r.get(entry.units[0])
    if value is None:
        return False
    decoded = decode_result(value)
    assert entry.good is not None
    return not isinstance(decoded, errors.RemoteError) and _equal(built, entry.good, decoded)
