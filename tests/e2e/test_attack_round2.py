"""Attacks on what round 2 built: the envelope's ``trace`` field, results stored in parts,
and ``sentinel://`` URLs, with real Redis and real worker processes.

What must hold (README, SECURITY.md): bad input at any layer gets a typed error naming
the job (or a dead-letter entry when no job can be named), the worker stays up, no other
key is touched, nothing is lost, nothing hangs. Hostile ``trace`` values in Celery bodies
and lane entries (tracing on and off) and a manifest planted before the worker writes
already held; these failed before their fix:

- a worker with tracing on and no OpenTelemetry logged a traceback in Celery's
  ``worker_ready`` and consumed anyway (every task then failed), and a command that
  builds a client (``hetbatch models list``) died with an ImportError traceback: both
  now stop at start with one ConfigError line;
- a ledger record whose envelope the worker refuses (a hostile ``trace``) was dropped by
  the reconciler, its job never answered: it is now published again and answered with
  the worker's refusal;
- an ensemble continuation the worker refuses (a hostile ``trace`` in a fusion task's body
  or a member task's ``then``) was dropped with a log line, its ensemble job never
  answered: the refusal is now that job's result;
- a planted manifest listing 65,536 parts cost its reader one MGET per listed part before
  the first missing one was reported: the reader now stops at the first bad part;
- a ``sentinel://`` URL with several sentinels and a password, or a port out of range,
  crashed ``hetbatch status`` (and any operator command) with a ValueError traceback, and
  the ``sentinel_password`` showed in the error line.

Every result checked is compared with the model's in-process output.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import redis

from hetbatch.producers import Client, JobFailed, JobLost
from hetbatch.producers.aio import AsyncClient
from hetbatch.producers.errors import JobError
from hetbatch.producers.jobs import Job
from hetbatch.producers.protocol import parts
from hetbatch.producers.protocol.ensemble import Continuation, member_job_id
from hetbatch.producers.protocol.keys import lane_list
from hetbatch.producers.protocol.kombu import celery_message, priority_list
from hetbatch.producers.protocol.schema import arrays_to_table
from hetbatch.producers.protocol.wire import FUSE_TASK_NAME, FUSION_QUEUE, TASK_NAME, Item, TaskEnvelope, encode_table
from hetbatch.worker.devtools.redis_server import RedisServer
from hetbatch.worker.ops.reconciler import Reconciler, Republisher
from tests.kit import spans
from tests.kit.broker import lose_message, queued_task_ids
from tests.kit.helpers import ROOT, WorkerProcess, column, register
from tests.kit.models import Built, sklearn_model

QUEUE = "sklearn.cpu"
MODEL = "atk2-iris"
VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
# W3C: an all-zero trace or span id is invalid; a receiver ignores it (no link), the job runs.
ACCEPTED: dict[str, str | None] = {
    "absent": None,
    "valid": VALID,
    "zero trace id": "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
    "zero span id": "00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-00",
}
REFUSED: dict[str, Any] = {
    "huge": "00-" + "a" * 1_000_000,
    "int": 12,
    "float": 1.5,
    "bool": True,
    "list": [VALID],
    "object": {"traceparent": VALID},
    "empty": "",
    "unicode digits": "00-" + "\u0663" * 32 + "-00f067aa0ba902b7-01",  # a \d regex would take them
    "upper case": VALID.upper(),
    "version ff": "ff" + VALID[2:],
    "newline": VALID + "\n",
    "nul": VALID[:-1] + "\x00",
    "tracestate glued on": VALID + ",congo=t61rcWkgMzE",
}


@pytest.fixture(scope="module")
def iris(work_dir: Path) -> Built:
    return sklearn_model(work_dir / MODEL, MODEL, "iris")


@pytest.fixture(scope="module", params=["tracing-on", "tracing-off"])
def traced(request: pytest.FixtureRequest, private_redis: str, work_dir: Path, iris: Built) -> Iterator[Any]:
    """A client and one real worker on ``QUEUE``, with tracing on (spans to a file) or off."""
    path = work_dir / f"atk2-spans-{request.param}-{time.monotonic_ns()}.jsonl"
    on = request.param == "tracing-on"
    env = {"HETBATCH_TRACING": "1", spans.ENV: str(path), "PYTHONPATH": str(spans.SITE)} if on else {}
    with Client.from_url(private_redis) as client:
        ref = register(client, iris.directory)
        worker = WorkerProcess(private_redis, work_dir, "--queues", f"{QUEUE},{FUSION_QUEUE}", env=env)
        try:
            yield client, worker, ref, path if on else None
        finally:
            worker.stop()


def _envelope(ref: str, job: str, x: np.ndarray, trace: Any, absent: bool = False) -> dict[str, Any]:
    name, version = ref.split("@")
    payload = bytes(encode_table(arrays_to_table({"X": x})))
    body = TaskEnvelope(
        name, version, (Item(job, 0, len(x)),), payload_b64=base64.b64encode(payload).decode()
    ).to_dict()
    if not absent:
        body["trace"] = trace
    return body


def _job(client: Client, ref: str, job: str, rows: int) -> Job:
    """A handle on a job whose message the test pushes itself (its record, as a producer writes it)."""
    client.redis.set(client.keys.job(job), json.dumps({"model": ref, "chunks": 1, "rows": rows}), ex=600)
    return client.job(job)


def test_hostile_trace_values_in_a_celery_body_and_a_lane_entry_are_refused_with_a_typed_error(
    traced: Any, iris: Built
) -> None:
    client, worker, ref, spans_path = traced
    r = client.redis
    watched = [client.keys.models(), client.keys.model(MODEL)]
    before = {k: r.dump(k) for k in watched}
    rng = np.random.default_rng(7)
    jobs: list[tuple[str, str, Job, np.ndarray]] = []
    for kind, value in [*ACCEPTED.items(), *REFUSED.items()]:
        for layer in ("celery", "lane"):
            job_id, x = uuid.uuid4().hex, iris.X[rng.integers(0, len(iris.X), 3)]
            body = _envelope(ref, job_id, x, value, absent=kind == "absent")
            handle = _job(client, ref, job_id, len(x))
            if layer == "celery":
                frame = celery_message(TASK_NAME, [body], QUEUE, 0, f"atk2 {job_id}", f"{job_id}.0")
                r.rpush(priority_list(QUEUE, 0), frame)
            else:
                r.rpush(lane_list(QUEUE), json.dumps(body))
            jobs.append((kind, layer, handle, x))
    good = client.submit(MODEL, iris.X[:9])  # a producer's job among them
    for kind, layer, handle, x in jobs:
        if kind in ACCEPTED:
            got = handle.result(timeout_s=60)
            np.testing.assert_array_equal(column(got, "label"), iris.model.predict(x), err_msg=f"{kind} {layer}")
            continue
        with pytest.raises(JobFailed) as caught:
            handle.result(timeout_s=60)
        assert caught.value.job_id == handle.id, (kind, layer)
        assert caught.value.remote_type == "PayloadError" and "trace" in caught.value.remote_message, (kind, layer)
        assert len(str(caught.value)) < 2000  # the huge value is not echoed whole
    np.testing.assert_array_equal(column(good.result(timeout_s=60), "label"), iris.model.predict(iris.X[:9]))
    assert worker.alive(), worker.output()[-3000:]
    assert {k: r.dump(k) for k in watched} == before  # the registry is untouched
    if spans_path is not None:  # tracing on: batches ran; none links an invalid (all-zero) id
        deadline = time.monotonic() + 30
        while not any(s["name"] == "hetbatch.batch" for s in spans.read(spans_path)):
            assert time.monotonic() < deadline, worker.output()[-3000:]
            time.sleep(0.05)
        links = [link for s in spans.read(spans_path) for link in s["links"]]
        assert links and all(int(t, 16) and int(s, 16) for t, s in links)
        assert ["4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"] in links


def test_a_manifest_planted_before_the_worker_writes_is_a_typed_error_and_the_worker_stays_up(
    traced: Any, iris: Built
) -> None:
    client, worker, ref, _ = traced
    r = client.redis
    job_id, x = uuid.uuid4().hex, iris.X[:4]
    handle = _job(client, ref, job_id, len(x))
    # The manifest lists parts of another job: part keys are derived from the job id, so it cannot point there.
    other = client.submit(MODEL, iris.X[4:8])
    r.set(client.keys.result(job_id, 0), b"M" + json.dumps([1000] * 3).encode(), ex=600)
    frame = celery_message(TASK_NAME, [_envelope(ref, job_id, x, VALID)], QUEUE, 0, "planted", f"{job_id}.0")
    r.rpush(priority_list(QUEUE, 0), frame)
    with pytest.raises(JobLost) as caught:  # first write wins: the worker's result is not stored over it
        handle.result(timeout_s=30)
    assert caught.value.job_id == job_id and "part 0 of 3" in str(caught.value)
    np.testing.assert_array_equal(column(other.result(timeout_s=60), "label"), iris.model.predict(iris.X[4:8]))
    assert worker.alive()


def test_a_continuation_with_a_hostile_trace_answers_its_ensemble_job_with_a_typed_error(
    traced: Any, iris: Built
) -> None:
    """As a fusion task's body, and as a member task's ``then``: before, the continuation was
    dropped with a log line and the ensemble job waited until its producer's timeout."""
    client, worker, ref, _ = traced
    r = client.redis
    for path in ("fusion body", "member then"):
        ensemble_job = uuid.uuid4().hex
        handle = _job(client, "atk2-mean@1", ensemble_job, 3)
        cont = Continuation("atk2-mean@1", ensemble_job, 0, 0, (0, 1), 3).to_dict()
        cont["trace"] = {"traceparent": VALID}
        if path == "fusion body":
            frame = celery_message(FUSE_TASK_NAME, [cont], FUSION_QUEUE, 0, "hostile fusion", f"{ensemble_job}.f")
            r.rpush(priority_list(FUSION_QUEUE, 0), frame)
        else:
            member = member_job_id(ensemble_job, 0, 0)
            body = _envelope(ref, member, iris.X[:3], VALID)
            body["then"] = cont
            r.rpush(priority_list(QUEUE, 0), celery_message(TASK_NAME, [body], QUEUE, 0, "member", f"{member}.0"))
        with pytest.raises(JobFailed) as caught:
            handle.result(timeout_s=30)
        assert caught.value.job_id == ensemble_job, path
        assert caught.value.remote_type == "PayloadError" and "trace" in caught.value.remote_message, path
    good = client.submit(MODEL, iris.X[10:14])
    np.testing.assert_array_equal(column(good.result(timeout_s=60), "label"), iris.model.predict(iris.X[10:14]))
    assert worker.alive()


def test_a_ledger_record_with_a_hostile_trace_is_published_again_and_answered_not_forgotten(
    redis_server: RedisServer, iris: Built, work_dir: Path
) -> None:
    with Client.from_url(redis_server.url) as client:
        register(client, iris.directory)
        job = client.submit(MODEL, iris.X[:5])
        task_id = f"{job.id}.0"
        assert lose_message(client, MODEL, task_id) == 1  # lost with its worker, say
        record = client.keys.task(task_id)
        body = json.loads(cast(bytes, client.redis.hget(record, "env")))
        body["trace"] = "00-" + "x" * 5000  # the copy the reconciler republishes
        client.redis.hset(record, "env", json.dumps(body))
        with Republisher(redis_server.url) as pub:
            rec = Reconciler(client.redis, client.keys, pub.publish, overdue_s=0)
            rec.sweep()
            report = rec.sweep()
        assert report.republished == [task_id]  # before the fix: dropped from the ledger, never answered
        assert queued_task_ids(client, MODEL) == [task_id]
        worker = WorkerProcess(redis_server.url, work_dir, "--queues", QUEUE)
        try:
            with pytest.raises(JobFailed) as caught:
                job.result(timeout_s=60)
            assert caught.value.remote_type == "PayloadError" and "trace" in caught.value.remote_message
            again = client.submit(MODEL, iris.X[5:9])
            np.testing.assert_array_equal(column(again.result(timeout_s=60), "label"), iris.model.predict(iris.X[5:9]))
        finally:
            worker.stop()


def _mgets(r: redis.Redis) -> int:
    stats = r.info("commandstats")
    return int(stats.get("cmdstat_mget", {}).get("calls", 0))


def test_a_manifest_listing_65536_huge_parts_fails_at_the_first_bad_part_for_both_clients(
    redis_server: RedisServer,
) -> None:
    """No timing: the reader's MGETs are counted (one per listed part before the fix)."""
    listed = b"M" + json.dumps([parts.MAX_PART_BYTES] * parts.MAX_PARTS).encode()
    with Client.from_url(redis_server.url) as client:
        r = client.redis

        def plant(first: bytes | None) -> str:
            job_id = uuid.uuid4().hex
            r.set(client.keys.job(job_id), json.dumps({"model": "m@1", "chunks": 1, "rows": 1}), ex=60)
            r.set(client.keys.result(job_id, 0), listed, ex=60)
            if first is not None:
                r.set(client.keys.result_part(job_id, 0, 0), first, ex=60)
            return job_id

        cases: list[tuple[str, type[JobError], str]] = [
            (plant(None), JobLost, "part 0 of 65536"),
            (plant(b"short"), JobFailed, "holds 5"),
        ]
        for job_id, error, words in cases:
            start = _mgets(r)
            with pytest.raises(error, match=words) as caught:
                client.job(job_id).result(timeout_s=5)
            assert caught.value.job_id == job_id
            assert _mgets(r) - start <= 4

        async def read_async() -> None:
            async with AsyncClient.from_url(redis_server.url) as aclient:
                for job_id, error, words in cases:
                    start = _mgets(r)
                    handle = await aclient.job(job_id)
                    with pytest.raises(error, match=words) as caught:
                        await handle.result(timeout_s=5)
                    assert caught.value.job_id == job_id
                    assert _mgets(r) - start <= 4

        asyncio.run(read_async())


def _cli(*args: str, env: dict[str, str] | None = None, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "hetbatch", *args], capture_output=True, text=True, env=full, timeout=timeout_s, cwd=ROOT
    )


@pytest.mark.parametrize("command", [["worker", "--queues", QUEUE], ["models", "list"]])
def test_tracing_on_without_opentelemetry_stops_a_worker_or_a_command_at_start_with_one_line(
    redis_url: str, tmp_path: Path, command: list[str]
) -> None:
    """One ``HETBATCH_TRACING=1`` for a fleet's environment reaches its operator commands too."""
    site = tmp_path / "no-otel"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['opentelemetry'] = None  # imports fail\n")
    env = {"HETBATCH_TRACING": "1", "HETBATCH_REDIS_URL": redis_url}
    done = subprocess.run(
        [sys.executable, "-m", "hetbatch", *command],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{ROOT}", **env),
        timeout=60,
        cwd=ROOT,
    )
    out = done.stdout + done.stderr
    # Before: the worker logged a traceback and went on consuming; the command raised ImportError.
    assert done.returncode == 2, out[-3000:]
    assert "Traceback" not in out and " ready." not in out, out[-3000:]
    (line,) = [t for t in done.stderr.splitlines() if t.startswith("hetbatch: ")]
    assert "ConfigError" in line and "OpenTelemetry" in line and "hetbatch[otel]" in line


def test_operator_commands_on_broken_or_unreachable_sentinel_urls_say_one_line_and_hide_every_password() -> None:
    """``hetbatch status`` here; every operator command shares the path (``worker.cli.main``).
    The URL shapes urllib cannot read are in tests/unit/test_attack_round2.py."""
    unreachable = (
        "sentinel://op:S3cret@127.0.0.1:1;sentinel://op:S3cret@127.0.0.1:2/0?master_name=m&sentinel_password=Sp1"
    )
    for url, words in [
        (unreachable, "BrokerError: cannot reach Redis"),
        ("sentinel://127.0.0.1:99999/0?master_name=m", "ConfigError: sentinel URL part 1"),
    ]:
        done = _cli("status", "--redis-url", url)
        assert done.returncode == 2, done.stderr[-3000:]
        assert "Traceback" not in done.stderr and words in done.stderr, done.stderr[-3000:]
        assert "S3cret" not in done.stderr and "Sp1" not in done.stderr
