"""Results stored in parts, through real Redis and a real worker whose ``max_result_bytes``
is set small (256 KiB): a chunk's result over it is stored in parts and read back whole
by the sync and async clients, rows in order and equal to the model run in-process;
a pack's result too, and an ensemble member's (read back whole by the fusion step);
deleting the job takes its parts with it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import redis
import torch

from hetbatch.producers import Client
from hetbatch.producers.aio import AsyncClient
from hetbatch.producers.protocol import parts
from hetbatch.producers.protocol.wire import Status
from hetbatch.worker.modelops.registration import register_path, write_config
from tests.kit.helpers import WorkerProcess, column, register
from tests.kit.models_rows import wide_output

MAX_RESULT_BYTES = 256 * 1024
WIDTH = 1024  # 4 KiB of outputs per row: 64 rows fill one part


@pytest.fixture(scope="module")
def worker(private_redis: str, work_dir: Path) -> Iterator[WorkerProcess]:
    proc = WorkerProcess(
        private_redis,
        work_dir,
        "--queues",
        "torch.cpu,fusion.cpu",
        "--concurrency",
        "4",
        env={"HETBATCH_MAX_RESULT_BYTES": str(MAX_RESULT_BYTES)},
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def model(work_dir: Path) -> tuple[Path, torch.jit.ScriptModule]:
    return wide_output(work_dir / "wide-parts", "wide-parts", WIDTH)


@pytest.fixture()
def parts_client(private_redis: str) -> Iterator[Client]:
    c = Client.from_url(private_redis)
    yield c
    c.close()


def in_process(scripted: torch.jit.ScriptModule, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return np.asarray(scripted(torch.from_numpy(x)).numpy())


def result_keys(r: redis.Redis, prefix: str, unit: str) -> list[bytes]:
    return sorted(r.scan_iter(match=f"{prefix}:res:{unit}:*", count=1000))


def test_results_over_max_result_bytes_come_back_whole_in_order_and_go_with_the_job(
    parts_client: Client, worker: WorkerProcess, model: tuple[Path, torch.jit.ScriptModule]
) -> None:
    directory, scripted = model
    ref = register(parts_client, directory)
    x = np.random.default_rng(0).normal(size=(1500, 1)).astype(np.float32)
    job = parts_client.submit(ref, {"x": x}, chunk_rows=500)
    assert job.chunks == 3  # each chunk's result, 2 MB, passes 256 KiB: stored in parts
    table = job.result(timeout_s=120)
    np.testing.assert_array_equal(column(table, "wide"), in_process(scripted, x))
    assert job.status() is Status.DONE
    r, keys = parts_client.redis, parts_client.keys
    for chunk in range(3):
        manifest = cast(bytes, r.get(keys.result(job.id, chunk)))
        sizes = parts.read_manifest(job.id, chunk, manifest)
        assert len(sizes) >= 8 and max(sizes) <= MAX_RESULT_BYTES
        assert r.exists(*parts.part_keys(keys, job.id, chunk, len(sizes))) == len(sizes)
        assert 0 < r.pttl(keys.result_part(job.id, chunk, 0)) <= r.pttl(keys.result(job.id, chunk)) + 1000
    assert len(result_keys(r, keys.prefix, job.id)) > 24
    job.delete()
    assert result_keys(r, keys.prefix, job.id) == []  # the parts went with their manifests


def test_a_pack_result_in_parts_and_the_async_client(
    private_redis: str, parts_client: Client, worker: WorkerProcess, model: tuple[Path, torch.jit.ScriptModule]
) -> None:
    directory, scripted = model
    ref = register(parts_client, directory)
    rng = np.random.default_rng(1)
    datas = [rng.normal(size=(n, 1)).astype(np.float32) for n in (40, 1, 90, 25)]
    jobs = parts_client.submit_many(ref, [{"x": d} for d in datas])
    assert len({j.unit for j in jobs}) == 1  # one pack: its 626 KB result is stored in parts
    for job, d in zip(jobs, datas, strict=True):
        np.testing.assert_array_equal(column(job.result(timeout_s=120), "wide"), in_process(scripted, d))
    assert parts.is_manifest(cast(bytes, parts_client.redis.get(parts_client.keys.result(jobs[0].unit, 0))))
    assert jobs[2].status() is Status.DONE

    async def run_async() -> None:
        async with AsyncClient.from_url(private_redis) as client:
            x = rng.normal(size=(700, 1)).astype(np.float32)
            job = await client.submit(ref, {"x": x})
            table = await job.result(timeout_s=120)
            np.testing.assert_array_equal(column(table, "wide"), in_process(scripted, x))
            assert await job.status() is Status.DONE
            await job.delete()

    asyncio.run(run_async())


def test_an_ensemble_fuses_member_results_stored_in_parts(
    parts_client: Client, worker: WorkerProcess, model: tuple[Path, torch.jit.ScriptModule], work_dir: Path
) -> None:
    directory, scripted = model
    register(parts_client, directory)
    twin = work_dir / "wide-parts-b"
    twin.mkdir(exist_ok=True)
    scripted.save(str(twin / "model.pt"))
    inputs = [{"name": "x", "dtype": "float32", "shape": [1]}]
    write_config(
        twin,
        name="wide-parts-b",
        framework="torch",
        artifact="model.pt",
        inputs=inputs,
        options={"output_names": ["wide"]},
    )
    register(parts_client, twin)
    ens = work_dir / "e-wide"
    ens.mkdir(exist_ok=True)
    (ens / "model.toml").write_text(
        'kind = "ensemble"\nname = "e-wide"\nstrategy = "mean"\n'
        '[[members]]\nname = "wide-parts"\n[[members]]\nname = "wide-parts-b"\n'
    )
    register_path(parts_client.registry, ens)
    x = np.random.default_rng(2).normal(size=(300, 1)).astype(np.float32)
    out = parts_client.predict("e-wide", {"x": x}, timeout_s=120)  # members' 1.2 MB results: in parts
    np.testing.assert_array_equal(column(out, "wide"), in_process(scripted, x))
