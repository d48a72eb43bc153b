"""Any row size through real Redis and a real worker: jobs cut by bytes (a 1,500-image
job of 903 MB; outputs of 1.1 GB), one oversized row refused by name and size, ragged
token sequences through torch and ONNX equal to each row run alone, and hostile list
payloads refused with the worker still up. The worker's peak RSS is bounded."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from hetbatch.producers import Client, JobFailed, PayloadTooLarge, SchemaMismatch
from hetbatch.producers.jobs import Job
from hetbatch.producers.protocol.schema import arrays_to_table
from hetbatch.producers.protocol.wire import Item, encode_table
from hetbatch.producers.publisher import Batch, priority_level
from tests.kit.helpers import WorkerProcess, column, register
from tests.kit.models_rows import image_cnn, run_rows_alone, token_model, tokens, wide_output

ATOL = 1e-5
RSS_BOUND_BYTES = 2 << 30
"""The worker's peak RSS (VmHWM) over a 903 MB input job and a 1.1 GB output job, at the
default 32 task threads: the in-flight byte budget (``max_inflight_bytes``, 256 MiB,
``worker.budget``) admits 8 chunks of 32 MiB (of input or of output) at once, each held
~3 times while encoding, plus the frameworks (~400 MB) and what 32 threads' malloc arenas
keep, whatever the job's size. Measured: 0.67 GB after the image job, 1.2-1.6 GB after
the output job (two runs; it was 2.8 GB without the budget)."""


def peak_rss(worker: WorkerProcess) -> int:
    for line in Path(f"/proc/{worker.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def worker(private_redis: str, work_dir: Path) -> Iterator[WorkerProcess]:
    """A worker of this module's own (its RSS is this module's jobs' only)."""
    proc = WorkerProcess(private_redis, work_dir, "--queues", "torch.cpu,onnx.cpu")  # default concurrency (32)
    yield proc
    proc.stop()


@pytest.fixture()
def rows_client(private_redis: str) -> Iterator[Client]:
    c = Client.from_url(private_redis)
    yield c
    c.close()


def submit_bytes(client: Client, model: str, blob: bytes, rows: int) -> Job:
    """Publish ``blob`` as a one-chunk job's payload as it is: what a hostile producer sends."""
    spec = client.spec(model)
    job = Job(client.replies, uuid.uuid4().hex, spec.ref, 1, rows)
    batch = Batch()
    client.publisher.record(batch, job.id, job.model, 1, rows)
    client.replies.track(job.id, 1)
    payload = client.transport.place(blob, job.id, 0, batch)
    env = client._envelope(spec, [Item(job.id, 0, rows)], payload, None)
    client.publisher.enqueue(batch, client._route(spec), env, priority_level("normal"))
    client.publisher.send(batch)
    return job


@pytest.mark.parametrize("framework", ["torch", "onnx"])
def test_token_sequences_of_lengths_1_to_300_equal_each_row_run_alone(
    rows_client: Client, worker: WorkerProcess, work_dir: Path, framework: str
) -> None:
    directory, run = token_model(work_dir / f"tokens-{framework}", f"tokens-{framework}", framework)
    ref = register(rows_client, directory)
    rows = tokens(600, 1, 300, seed=1)
    hidden, pooled = run_rows_alone(run, rows)
    table = rows_client.predict(ref, {"ids": rows}, timeout_s=120)
    np.testing.assert_allclose(column(table, "pooled"), pooled, rtol=0, atol=ATOL)
    got = table.column("hidden").to_pylist()
    assert [len(h) for h in got] == [len(r) for r in rows]  # unpadded, in order
    for want, have in zip(hidden, got, strict=True):
        np.testing.assert_allclose(np.asarray(have, dtype=np.float32), want, rtol=0, atol=ATOL)


def test_empty_and_overlong_sequences_get_a_clear_error(
    rows_client: Client, worker: WorkerProcess, work_dir: Path
) -> None:
    directory, _ = token_model(work_dir / "tokens-limits", "tokens-limits", "torch", max_length=300)
    ref = register(rows_client, directory)
    ok = tokens(3, 1, 10)
    with pytest.raises(SchemaMismatch, match=r"row 1 is an empty sequence"):
        rows_client.submit(ref, {"ids": [ok[0], np.zeros(0, np.int64), ok[1]]})
    with pytest.raises(SchemaMismatch, match=r"row 2 has 301 elements, over max_length=300"):
        rows_client.submit(ref, {"ids": [ok[0], ok[1], np.zeros(301, np.int64)]})
    # A producer that skips the client's checks meets the worker's: the job fails, typed.
    rows = np.empty(2, dtype=object)
    rows[0], rows[1] = ok[0], np.zeros(301, np.int64)
    job = submit_bytes(rows_client, ref, bytes(encode_table(arrays_to_table({"ids": rows}))), 2)
    with pytest.raises(JobFailed, match=r"over max_length=300") as info:
        job.result(timeout_s=60)
    assert info.value.remote_type == "SchemaMismatch"


def _patched(good: bytes, old: list[int], new: list[int], dtype: str = "int32") -> bytes:
    before, after = np.array(old, dtype).tobytes(), np.array(new, dtype).tobytes()
    assert good.count(before) == 1
    return good.replace(before, after)


def test_hostile_list_payloads_get_a_typed_error_and_the_worker_stays_up(
    rows_client: Client, worker: WorkerProcess, work_dir: Path
) -> None:
    directory, run = token_model(work_dir / "tokens-hostile", "tokens-hostile", "torch")
    ref = register(rows_client, directory)
    rows = np.empty(3, dtype=object)
    rows[0], rows[1], rows[2] = np.arange(3), np.arange(4), np.arange(5)
    good = bytes(encode_table(arrays_to_table({"ids": rows})))
    offsets = [0, 3, 7, 12]
    hostile = {
        "offsets out of bounds": _patched(good, offsets, [0, 3, 7, 50]),
        "negative length": _patched(good, offsets, [0, 5, 2, 12]),
        "negative offset": _patched(good, offsets, [-4, 3, 7, 12]),
        "a billion declared elements": _patched(good, offsets, [0, 3, 7, 1_000_000_000]),
        # the values child's field node (length 12, 0 nulls) claiming a billion values
        "a billion-value child": _patched(good, [12, 0], [1_000_000_000, 0], "int64"),
    }
    for what, blob in hostile.items():
        job = submit_bytes(rows_client, ref, blob, 3)
        with pytest.raises(JobFailed) as info:
            job.result(timeout_s=60)
        assert info.value.remote_type == "PayloadError", what
        assert worker.alive(), what
    # ...and serves the next good job.
    table = rows_client.predict(ref, {"ids": list(rows)}, timeout_s=60)
    np.testing.assert_allclose(column(table, "pooled"), run_rows_alone(run, list(rows))[1], rtol=0, atol=ATOL)


def test_a_single_300_mb_row_fails_with_its_size(rows_client: Client, worker: WorkerProcess, work_dir: Path) -> None:
    directory, _ = token_model(work_dir / "tokens-unbounded", "tokens-unbounded", "torch", max_length=None)
    ref = register(rows_client, directory)
    huge = np.zeros(300_000_000 // 8, dtype=np.int64)
    with pytest.raises(PayloadTooLarge, match=r"row 1 of the input is 300000004 bytes \(286.1 MiB\)"):
        rows_client.submit(ref, {"ids": [np.arange(5), huge, np.arange(3)]})


def test_a_903_mb_image_job_equals_in_process_and_the_worker_stays_bounded(
    rows_client: Client, worker: WorkerProcess, work_dir: Path
) -> None:
    directory, scripted = image_cnn(work_dir / "cnn224", "cnn224")
    ref = register(rows_client, directory)
    images = np.random.default_rng(0).standard_normal((1500, 3, 224, 224), dtype=np.float32)
    assert images.nbytes > 800e6
    job = rows_client.submit(ref, {"x": images})
    assert job.chunks >= 27  # by bytes (32 MiB), not one 903 MB payload
    with torch.inference_mode():
        want = np.concatenate([scripted(torch.from_numpy(images[i : i + 100])).numpy() for i in range(0, 1500, 100)])
    got = column(job.result(timeout_s=300), "logits")
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    print(f"worker peak RSS {peak_rss(worker) / 2**20:.0f} MiB")
    assert peak_rss(worker) < RSS_BOUND_BYTES, peak_rss(worker)


def test_a_job_whose_outputs_pass_1_gb_succeeds(rows_client: Client, worker: WorkerProcess, work_dir: Path) -> None:
    directory, _ = wide_output(work_dir / "wide", "wide")
    ref = register(rows_client, directory)
    assert rows_client.spec(ref).output_bytes == 65_536 * 4  # measured at registration
    x = np.linspace(-2, 2, 4200, dtype=np.float32).reshape(-1, 1)
    job = rows_client.submit(ref, {"x": x})
    assert job.chunks >= 33  # cut by the expected output bytes: 32 MiB of results per chunk
    table = job.result(timeout_s=300)
    assert table.num_rows == 4200 and table.nbytes > 1e9
    ramp = np.linspace(-1.0, 1.0, 65_536, dtype=np.float32)
    start = 0
    for chunk in table.column("wide").chunks:  # compared chunk by chunk: no second 1.1 GB copy
        got = chunk.flatten().to_numpy().reshape(len(chunk), -1)
        want = x[start : start + len(chunk)] * ramp
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
        start += len(chunk)
    job.delete()
    print(f"worker peak RSS {peak_rss(worker) / 2**20:.0f} MiB")
    assert peak_rss(worker) < RSS_BOUND_BYTES, peak_rss(worker)
