"""Results stored in parts (``producers.protocol.parts``): the worker's outcomes over
``max_result_bytes`` become a manifest and parts, the store keeps the first write's parts
only, and a hostile or partial manifest read by the client raises a typed error naming
the job, at once (real Redis; no worker: the keys are written as a hostile party would)."""

from __future__ import annotations

import uuid
from typing import cast

import numpy as np
import pyarrow as pa
import pytest
import redis

from hetbatch.producers import Client
from hetbatch.producers.errors import JobFailed, JobLost
from hetbatch.producers.jobs import Job, assemble
from hetbatch.producers.protocol import parts
from hetbatch.producers.protocol.keys import Keys
from hetbatch.producers.protocol.retention import delete_job
from hetbatch.producers.protocol.wire import Item, TaskEnvelope, encode_result
from hetbatch.worker.devtools.redis_server import RedisServer
from hetbatch.worker.results import STAGE_BYTES, Done, Outcome, ResultWriter, outcomes_of


def table(rows: int) -> pa.Table:
    return pa.table({"y": np.arange(rows * 8, dtype=np.float64).reshape(rows, 8).tolist()})


def test_split_and_join_give_back_the_bytes_in_order() -> None:
    data = bytes(range(256)) * 41
    manifest, views = parts.split(data, 1000)
    sizes = parts.read_manifest("j", 0, manifest)
    assert sizes == [1000] * 10 + [496] and [len(v) for v in views] == sizes
    assert parts.join("j", 0, sizes, [bytes(v) for v in views]) == data
    assert [list(g) for g in parts.groups([5, 5, 5, 20, 1], budget_bytes=10)] == [[0, 1], [2], [3], [4]]


def test_an_outcome_over_max_bytes_is_a_manifest_of_parts_and_reads_back_equal() -> None:
    env = TaskEnvelope("m", "1", (Item("job-a", 0, 300), Item("job-b", 0, 10)), payload_b64="")
    done = Done(0, list(env.items), table=table(310))
    big, small = outcomes_of(env, [done], max_bytes=4096)
    assert parts.is_manifest(big.result) and len(big.parts) > 1 and max(len(p) for p in big.parts) <= 4096
    assert not parts.is_manifest(small.result) and small.parts == ()
    sizes = parts.read_manifest("job-a", 0, big.result)
    whole = parts.join("job-a", 0, sizes, [bytes(p) for p in big.parts])
    assert assemble("job-a", 1, {0: whole}).equals(table(300))


def test_the_first_write_keeps_its_parts_and_delete_takes_them(client: Client) -> None:
    r, keys = client.redis, client.keys
    job = uuid.uuid4().hex
    writer = ResultWriter(r, keys, ttl_s=60, inline_bytes=0)
    first = outcomes_of(
        TaskEnvelope("m", "1", (Item(job, 0, 200),), payload_b64=""), [Done(0, [Item(job, 0, 200)], table(200))], 2048
    )
    again = outcomes_of(
        TaskEnvelope("m", "1", (Item(job, 0, 100),), payload_b64=""), [Done(0, [Item(job, 0, 100)], table(100))], 999
    )
    assert writer.write(first, None) == 1
    assert writer.write(again, None) == 0  # a redelivery loses: none of its parts is written
    sizes = parts.read_manifest(job, 0, cast(bytes, r.get(keys.result(job, 0))))
    got = cast(list[bytes | None], r.mget(parts.part_keys(keys, job, 0, len(sizes))))
    assert assemble(job, 1, {0: parts.join(job, 0, sizes, got)}).equals(table(200))
    assert r.exists(keys.result_part(job, 0, len(sizes))) == 0
    assert delete_job(r, keys, job, 1) == 1 + len(sizes)
    assert r.exists(*parts.part_keys(keys, job, 0, len(sizes))) == 0


HOSTILE = {
    "missing part": (b"M[10, 10]", {0: b"A" * 10}, JobLost, "part 1 of 2"),
    "shorter part": (b"M[10]", {0: b"A" * 9}, JobFailed, "holds 9"),
    "part over its size": (b"M[10]", {0: b"A" * 11}, JobFailed, "holds 11"),
    "no parts": (b"M[]", {}, JobFailed, "1 to 65536"),
    "too many parts": (b"M" + str([1] * 70_000).encode(), {}, JobFailed, "1 to 65536"),
    "size over a Redis string": (b"M[1073741824]", {}, JobFailed, "not an int"),
    "bool size": (b"M[true]", {0: b"A"}, JobFailed, "not an int"),
    "not JSON": (b"M[1,", {}, JobFailed, "not JSON"),
    "not a list": (b'M{"n": 1}', {}, JobFailed, "1 to 65536"),
    "parts holding a manifest": (b"M[4]", {0: b"M[4]"}, JobFailed, "another manifest"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_manifest_is_a_typed_error_naming_the_job(client: Client, case: str) -> None:
    manifest, stored, error, words = HOSTILE[case]
    r, keys = client.redis, client.keys
    job = Job(client.replies, uuid.uuid4().hex, "m@1", 1, 1)
    r.set(keys.job(job.id), b"{}", ex=60)
    r.set(keys.result(job.id, 0), manifest, ex=60)
    for i, value in stored.items():
        r.set(keys.result_part(job.id, 0, i), value, ex=60)
    with pytest.raises(error, match=words) as caught:
        job.result(timeout_s=5)
    assert isinstance(caught.value, JobLost | JobFailed) and caught.value.job_id == job.id
    delete_job(r, keys, job.id, 1)


def test_parts_that_join_to_a_good_result_are_read(client: Client) -> None:
    r, keys = client.redis, client.keys
    job = Job(client.replies, uuid.uuid4().hex, "m@1", 1, 5)
    manifest, views = parts.split(encode_result(table(5)), 100)
    r.set(keys.job(job.id), b"{}", ex=60)
    r.set(keys.result(job.id, 0), manifest, ex=60)
    for i, view in enumerate(views):
        r.set(keys.result_part(job.id, 0, i), bytes(view), ex=60)
    assert job.result(timeout_s=5).equals(table(5))
    assert delete_job(r, keys, job.id, 1) == 2 + len(views)


def test_big_values_are_staged_and_renamed_first_write_wins_and_a_tombstone_drops_them(client: Client) -> None:
    r, keys = client.redis, client.keys
    job, gone = uuid.uuid4().hex, uuid.uuid4().hex
    writer = ResultWriter(r, keys, ttl_s=60, inline_bytes=0)

    def outcomes(job_id: str, rows: int, max_bytes: int) -> list[Outcome]:
        env = TaskEnvelope("m", "1", (Item(job_id, 0, rows),), payload_b64="")
        return outcomes_of(env, [Done(0, list(env.items), table(rows))], max_bytes)

    whole, in_parts = outcomes(job, 30_000, 1 << 30), outcomes(job + "p", 60_000, STAGE_BYTES + 1)
    assert len(whole[0].result) >= STAGE_BYTES and len(in_parts[0].parts) == 4
    assert writer.write_many([(whole, None, None), (in_parts, None, None)]) == [1, 1]
    assert writer.write(outcomes(job, 20_000, 1 << 30), None) == 0  # staged too, and dropped
    assert assemble(job, 1, {0: cast(bytes, r.get(keys.result(job, 0)))}).equals(table(30_000))
    assert 0 < r.pttl(keys.result(job, 0)) <= 60_000
    sizes = parts.read_manifest(job + "p", 0, cast(bytes, r.get(keys.result(job + "p", 0))))
    got = cast(list[bytes | None], r.mget(parts.part_keys(keys, job + "p", 0, len(sizes))))
    assert assemble(job, 1, {0: parts.join(job, 0, sizes, got)}).equals(table(60_000))
    r.set(keys.gone(gone), "deleted", ex=60)
    assert writer.write(outcomes(gone, 30_000, 1 << 30), None) == 0
    assert r.exists(keys.result(gone, 0)) == 0
    assert [k for k in r.scan_iter(match=f"{keys.prefix}:res:*:stage:*", count=1000)] == []  # none left behind
    delete_job(r, keys, job, 1)
    delete_job(r, keys, job + "p", 1)


def test_the_documented_acl_user_may_store_staged_values_and_parts() -> None:
    """The store script's RENAME runs under the user SECURITY.md lists (scripts obey the ACL)."""
    from tests.e2e.test_acl import ADMIN_PASSWORD, PASSWORD, USER, documented_rule

    server = RedisServer("--requirepass", ADMIN_PASSWORD)
    try:
        admin = redis.Redis(port=server.port, password=ADMIN_PASSWORD)
        admin.execute_command("ACL", "SETUSER", *documented_rule())
        r = redis.Redis(port=server.port, username=USER, password=PASSWORD)
        job = uuid.uuid4().hex
        env = TaskEnvelope("m", "1", (Item(job, 0, 60_000),), payload_b64="")
        outcomes = outcomes_of(env, [Done(0, list(env.items), table(60_000))], STAGE_BYTES + 1)
        assert ResultWriter(r, Keys(), ttl_s=60, inline_bytes=0).write(outcomes, None) == 1
        assert parts.is_manifest(cast(bytes, r.get(Keys().result(job, 0))))
        assert admin.acl_log() == []
        r.close()
        admin.close()
    finally:
        server.stop()
