"""Merge/split and the accumulator, without a broker."""

from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np
import pytest

from hetbatch.adapters.base import DeviceFailed, PredictError
from hetbatch.worker.batching import Batcher, BatchStats, Request, join, merge, split
from hetbatch.worker.budget import CallSize


def double(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"y": inputs["x"] * 2}


def test_merge_then_split_gives_each_request_its_rows() -> None:
    reqs = [Request({"x": np.full((n, 2), n, np.float32)}, n) for n in (1, 3, 2)]
    merged, slices = merge(reqs)
    assert merged["x"].shape == (6, 2)
    parts = split(double(merged), slices)
    for req, part in zip(reqs, parts):
        np.testing.assert_array_equal(part["y"], req.inputs["x"] * 2)


def test_a_single_request_is_not_copied() -> None:
    x = np.ones((4, 2))
    merged, _ = merge([Request({"x": x}, 4)])
    assert merged["x"] is x


def test_split_enforces_the_output_length_invariant() -> None:
    with pytest.raises(PredictError, match="3 input rows"):
        split({"y": np.zeros(2)}, [slice(0, 3)])


def _batcher(predict, **kw):  # type: ignore[no-untyped-def]
    stats: list[BatchStats] = []
    kw.setdefault("max_batch_rows", 64)
    kw.setdefault("max_delay_ms", 50)
    return Batcher(predict, on_batch=stats.append, **kw), stats


def test_concurrent_requests_are_coalesced() -> None:
    batcher, stats = _batcher(double)
    start = threading.Barrier(16)
    futures = []

    def go(i: int) -> None:
        start.wait()
        futures.append((i, batcher.submit({"x": np.full((2, 1), i, np.float64)}, 2)))

    threads = [threading.Thread(target=go, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, fut in futures:
        np.testing.assert_array_equal(join(fut.result(timeout=5))["y"], np.full((2, 1), 2 * i))
    assert len(stats) < 16 and sum(s.rows for s in stats) == 32
    batcher.close()


def test_a_big_request_is_cut_to_max_batch_rows() -> None:
    seen: list[int] = []

    def record(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        seen.append(len(inputs["x"]))
        return double(inputs)

    batcher, _ = _batcher(record, max_batch_rows=10)
    out = join(batcher.submit({"x": np.arange(25.0)[:, None]}, 25).result(timeout=5))
    np.testing.assert_array_equal(out["y"][:, 0], np.arange(25.0) * 2)
    assert seen == [10, 10, 5]
    batcher.close()


def test_a_poisoned_request_fails_alone_after_bisection() -> None:
    def picky(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if (inputs["x"] < 0).any():
            raise ValueError("negative input")
        return double(inputs)

    batcher, _ = _batcher(picky, max_batch_rows=1000, max_delay_ms=200)
    futures = [batcher.submit({"x": np.full((1, 1), -1.0 if i == 37 else float(i))}, 1) for i in range(64)]
    results = []
    for i, fut in enumerate(futures):
        if i == 37:
            with pytest.raises(ValueError, match="negative"):
                fut.result(timeout=5)
        else:
            results.append(join(fut.result(timeout=5))["y"][0, 0] == 2 * i)
    assert len(results) == 63 and all(results)
    batcher.close()


def test_out_of_memory_halves_the_batch_and_succeeds() -> None:
    calls: list[int] = []

    def small_memory(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(len(inputs["x"]))
        if len(inputs["x"]) > 16:
            raise MemoryError("out of memory")
        return double(inputs)

    batcher, _ = _batcher(small_memory, max_batch_rows=64)
    out = join(batcher.submit({"x": np.arange(64.0)[:, None]}, 64).result(timeout=5))
    np.testing.assert_array_equal(out["y"][:, 0], np.arange(64.0) * 2)
    assert calls[:3] == [64, 32, 16] and sum(c for c in calls if c <= 16) == 64
    batcher.close()


def test_outputs_come_back_as_views_of_each_call_never_joined() -> None:
    """A request's outputs are the calls' own arrays (one piece per call): the result file
    is written from them, so joining them here would copy every output row once more."""
    made: list[np.ndarray] = []

    def keep(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        made.append(double(inputs)["y"])
        return {"y": made[-1]}

    batcher, _ = _batcher(keep, max_batch_rows=10)
    pieces = batcher.submit({"x": np.arange(25.0)[:, None]}, 25).result(timeout=5)
    assert [len(p["y"]) for p in pieces] == [10, 10, 5]
    assert all(np.shares_memory(p["y"], m) for p, m in zip(pieces, made, strict=True))
    batcher.close()


def test_merged_requests_cut_across_the_calls_of_a_halved_batch() -> None:
    """Requests merged into one batch that runs in several calls (after an out-of-memory
    error) each get exactly their rows, in pieces where they span two calls."""
    entered, release = threading.Event(), threading.Event()

    def small_memory(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if inputs["x"][0, 0] < 0:  # the holder
            entered.set()
            release.wait(5)
        elif len(inputs["x"]) > 4:
            raise MemoryError("out of memory")
        return double(inputs)

    batcher, _ = _batcher(small_memory, max_batch_rows=64, max_delay_ms=0, incoming=lambda: 1)
    busy = batcher.submit({"x": -np.ones((1, 1))}, 1)
    assert entered.wait(5)
    sizes = (3, 0, 5, 1, 2)
    futures = [batcher.submit({"x": np.full((n, 1), float(i))}, n) for i, n in enumerate(sizes)]
    release.set()
    busy.result(timeout=5)
    for i, (n, fut) in enumerate(zip(sizes, futures, strict=True)):
        pieces = fut.result(timeout=5)
        assert sum(len(p["y"]) for p in pieces) == n and all(len(p["y"]) <= 4 for p in pieces)
        np.testing.assert_array_equal(join(pieces)["y"], np.full((n, 1), 2.0 * i))
    batcher.close()


def test_a_lone_request_does_not_wait_when_nothing_else_is_coming() -> None:
    import time

    batcher, _ = _batcher(double, max_delay_ms=2000, incoming=lambda: 0)
    started = time.monotonic()
    batcher.submit({"x": np.ones((1, 1))}, 1).result(timeout=5)
    assert time.monotonic() - started < 1.0
    batcher.close()


def test_a_lone_request_runs_on_the_callers_thread_and_a_busy_model_queues() -> None:
    """Nothing queued or on its way: no hand-off to the batcher thread (latency). While a
    call runs, the next request waits for the batcher instead of calling the model twice."""
    threads: list[str] = []
    release = threading.Event()

    def record(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        threads.append(threading.current_thread().name)
        if len(threads) == 1:
            release.wait(5)
        return double(inputs)

    batcher, stats = _batcher(record, incoming=lambda: 0)
    first = threading.Thread(target=lambda: batcher.submit({"x": np.ones((1, 1))}, 1), name="caller")
    first.start()
    while not threads:
        pass
    second = batcher.submit({"x": np.ones((2, 1))}, 2)  # the model is busy: queued
    assert not second.done()
    release.set()
    first.join()
    np.testing.assert_array_equal(join(second.result(timeout=5))["y"], np.full((2, 1), 2.0))
    assert threads[0] == "caller" and threads[1].startswith("batcher-")
    assert [s.rows for s in stats] == [1, 2]
    batcher.close()


def test_a_big_request_is_shared_by_every_instance() -> None:
    """With two instances, the pieces of one big request run on both at once (a big job's
    first and last chunks would otherwise use one core)."""
    threads: set[str] = set()
    both = threading.Barrier(2, timeout=5)

    def record(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        name = threading.current_thread().name
        if name not in threads:
            threads.add(name)
            both.wait()  # returns only once two calls are in flight together
        return double(inputs)

    batcher, _ = _batcher(record, max_batch_rows=10, instances=2, incoming=lambda: 0)
    out = join(batcher.submit({"x": np.arange(45.0)[:, None]}, 45).result(timeout=10))
    np.testing.assert_array_equal(out["y"][:, 0], np.arange(45.0) * 2)
    assert len(threads) == 2 and all(t.startswith("batcher-") for t in threads)
    batcher.close()


def test_a_failing_piece_fails_the_big_request() -> None:
    def picky(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if (inputs["x"] == 33).any():
            raise ValueError("row 33 is poisoned")
        return double(inputs)

    batcher, _ = _batcher(picky, max_batch_rows=10, instances=2)
    with pytest.raises(ValueError, match="poisoned"):
        join(batcher.submit({"x": np.arange(45.0)[:, None]}, 45).result(timeout=10))
    batcher.close()


def test_busy_time_counts_overlapping_calls_once() -> None:
    import time

    both = threading.Barrier(2, timeout=5)

    def slow(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        both.wait()
        time.sleep(0.2)
        return double(inputs)

    batcher, stats = _batcher(slow, max_batch_rows=10, instances=2)
    join(batcher.submit({"x": np.arange(20.0)[:, None]}, 20).result(timeout=10))
    deadline = time.monotonic() + 5
    while len(stats) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    compute, busy = sum(s.compute_s for s in stats), sum(s.busy_s for s in stats)
    assert compute >= 0.4 and 0.2 <= busy < 0.3
    batcher.close()


def test_the_learned_call_size_survives_across_jobs() -> None:
    """A model that runs out of memory above 16 rows: the first job learns it, the second
    identical job meets no out-of-memory error at all."""
    ooms: list[int] = []

    def small_gpu(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if len(inputs["x"]) > 16:
            ooms.append(len(inputs["x"]))
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
        return double(inputs)

    batcher, _ = _batcher(small_gpu, max_batch_rows=100)
    x = np.arange(100.0)[:, None]
    first = join(batcher.submit({"x": x}, 100).result(timeout=5))
    assert ooms == [100, 50, 25] and batcher.call_size.rows == 12
    second = join(batcher.submit({"x": x}, 100).result(timeout=5))
    assert ooms == [100, 50, 25]  # nothing new: the second job ran at the learned size
    np.testing.assert_array_equal(first["y"], x * 2)
    np.testing.assert_array_equal(second["y"], x * 2)
    batcher.close()


def test_the_call_size_probes_upward_only_after_many_clean_calls() -> None:
    size = CallSize(64, probe_after=3)
    assert size.out_of_memory(64) == 32
    size.succeeded(10)  # a short call says nothing about 32 rows
    size.succeeded(32)
    size.succeeded(32)
    assert size.rows == 32
    size.succeeded(32)
    assert size.rows == 64  # the probe
    assert size.out_of_memory(64) == 32 and size.probe_after == 6  # a failed probe: wait longer next time


def test_a_sticky_device_error_goes_to_on_fatal_and_answers_nobody() -> None:
    fatal: list[BaseException] = []

    def poisoned(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise DeviceFailed("torch on gpu: CUDA error: an illegal memory access was encountered")

    batcher = Batcher(poisoned, max_batch_rows=8, max_delay_ms=0, on_fatal=fatal.append)
    future = batcher.submit({"x": np.ones((4, 1))}, 4)
    import time

    deadline = time.monotonic() + 5
    while not fatal and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(fatal) == 1 and isinstance(fatal[0], DeviceFailed) and not future.done()
    batcher.close()


def test_requests_of_many_bytes_are_called_alone_and_small_ones_merge() -> None:
    """Past MERGE_BYTES a call has paid for itself: merging big requests would only copy them."""
    from hetbatch.worker.batching import MERGE_BYTES

    entered, release = threading.Event(), threading.Event()

    def hold(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        entered.set()
        release.wait(5)
        return double(inputs)

    batcher, stats = _batcher(hold, max_batch_rows=1_000, max_delay_ms=0, incoming=lambda: 1)
    busy = batcher.submit({"x": np.ones((1, 1))}, 1)  # holds the model while the others queue
    assert entered.wait(5)
    row = MERGE_BYTES // 8  # float64 elements: one row is MERGE_BYTES
    big = [batcher.submit({"x": np.full((1, row), i, np.float64)}, 1) for i in range(2)]
    small = [batcher.submit({"x": np.full((3, 1), i, np.float64)}, 3) for i in range(4)]
    release.set()
    for i, fut in enumerate(big):
        assert join(fut.result(timeout=10))["y"][0, 0] == 2.0 * i
    for i, fut in enumerate(small):
        np.testing.assert_array_equal(join(fut.result(timeout=10))["y"], np.full((3, 1), 2.0 * i))
    busy.result(timeout=10)
    assert [(s.rows, s.requests) for s in stats] == [(1, 1), (1, 1), (1, 1), (12, 4)]
    batcher.close()


def test_a_result_keeps_big_calls_apart_and_joins_small_ones() -> None:
    """Calls of a MiB or more become a record batch each (written out without a copy);
    thousands of one-row calls (a batch-1 model) become one batch, not a header per row."""
    from types import SimpleNamespace

    from hetbatch.worker.runtime import PIECE_BYTES, Runtime

    spec = SimpleNamespace(outputs=["y"])
    wide = PIECE_BYTES // 8
    big = [{"y": np.full((2, wide // 2), float(i))} for i in range(3)]
    table = Runtime._select(big, spec)  # type: ignore[arg-type]
    assert table.column("y").num_chunks == 3 and table.num_rows == 6
    assert all(np.shares_memory(c.values.to_numpy(), p["y"]) for c, p in zip(table.column("y").chunks, big))
    small = [{"y": np.full((1, 3), float(i)), "other": np.zeros(1)} for i in range(5_000)]
    table = Runtime._select(small, spec)  # type: ignore[arg-type]
    assert table.column_names == ["y"] and table.column("y").num_chunks == 1
    np.testing.assert_array_equal(np.stack(table.column("y").to_pylist()), join(small)["y"])
