"""Hostile and malformed payloads: a clear error result for each, no worker crash, bounded memory.

The payload generator (hypothesis) covers truncation, bit flips, random bytes, wrong
schema, wrong dtype and width, nulls, NaN/inf (the model rejects them), dictionary,
nested and extension types, LZ4/ZSTD compression including a decompression bomb,
huge declared row counts, buffer lengths and metadata lengths, row counts that
disagree with the envelope, bad base64, missing and oversize payloads.

A mutation can leave a payload valid (a flipped bit inside a float value, a cut that
only drops the end-of-stream marker); such a payload must then get the model's own
prediction for what it decodes to. Everything else must get an error result.
"""

from __future__ import annotations

import base64
import functools
import json
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hetbatch.producers import Client, ClientSettings, HetbatchError, PayloadError, PayloadTooLarge
from hetbatch.producers.client import make_producer_app
from hetbatch.producers.protocol.ipc import _Flat
from hetbatch.producers.protocol.schema import TensorSpec, table_to_arrays
from hetbatch.producers.protocol.wire import TASK_NAME, Item, TaskEnvelope, decode_notice, decode_result, decode_table
from hetbatch.producers.protocol.wire import encode_table as _encode_table
from hetbatch.worker.devtools.redis_server import RedisServer
from tests.kit.helpers import WorkerProcess, column, register
from tests.kit.models import Built, sklearn_model

INPUTS = (TensorSpec("X", "float64", (4,)),)
MAX_PAYLOAD = 256 * 1024  # the fuzz worker's max_payload_bytes
ERROR_TYPES = {"PayloadError", "PayloadTooLarge", "SchemaMismatch", "JobLost"}
_IRIS = np.random.default_rng(1).normal(5.0, 1.5, (64, 4))


def encode_table(table: pa.Table) -> bytes:
    return bytes(_encode_table(table))  # hypothesis hashes what it draws


def _table(x: np.ndarray, name: str = "X", value_type: pa.DataType | None = None) -> pa.Table:
    flat = pa.array(x.reshape(-1), type=value_type or pa.float64())
    return pa.table({name: pa.FixedSizeListArray.from_arrays(flat, x.shape[1])})


def _compressed(table: pa.Table, codec: str) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression=codec)) as writer:
        writer.write(table)
    return bytes(sink.getvalue().to_pybytes())


@functools.cache
def _bomb() -> bytes:
    """~3 KiB of ZSTD that inflates to 128 MiB of zeros, as 4M rows of float64[4]."""
    return _compressed(_table(np.zeros((4_000_000, 4))), "zstd")


def _batch_header_offsets(data: bytes) -> tuple[int, int, int]:
    """(metadata start, rows field position, a buffer-length position) of the first record batch."""
    schema_len = struct.unpack_from("<i", data, 4)[0]
    start = 8 + schema_len + 8  # the schema message has no body; skip the batch's length prefix
    meta_len = struct.unpack_from("<i", data, start - 4)[0]
    flat = _Flat(data[start : start + meta_len])
    header = flat.child(flat.table(flat._unpack("<I", 0)), 2)
    assert header is not None
    batch = flat.table(header)
    rows_at, buffers = flat.field(batch, 0), flat.child(batch, 2)
    assert rows_at is not None and buffers is not None
    return start, start + rows_at, start + buffers + 4 + 16 + 8  # second buffer's length


def _patch(data: bytes, at: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, at, value)
    return bytes(out)


KINDS = [
    "truncate", "bitflip", "garbage", "dtype", "width", "name", "scalar", "nulls", "nan", "extension",
    "dictionary", "nested", "compressed", "bomb", "huge_rows", "huge_buffer", "huge_metadata", "row_mismatch",
    "empty", "bad_base64", "oversize", "missing_key",
]  # fmt: skip


@st.composite
def payloads(draw: Any) -> dict[str, Any]:
    """One malformed (or mutated) task: {'kind', 'rows', 'data' | 'b64' | 'key_bytes' | 'missing'}."""
    kind = draw(st.sampled_from(KINDS))
    rows = draw(st.integers(1, 32))
    x = _IRIS[:rows]
    valid = encode_table(_table(x))
    out: dict[str, Any] = {"kind": kind, "rows": rows}
    if kind == "truncate":
        out["data"] = valid[: draw(st.integers(0, len(valid) - 1))]
    elif kind == "bitflip":
        data = bytearray(valid)
        for pos in draw(st.lists(st.integers(0, len(valid) * 8 - 1), min_size=1, max_size=8)):
            data[pos // 8] ^= 1 << (pos % 8)
        out["data"] = bytes(data)
    elif kind == "garbage":
        prefix = draw(st.sampled_from([b"", b"\xff\xff\xff\xff", valid[:16]]))
        out["data"] = prefix + draw(st.binary(max_size=300))
    elif kind == "dtype":
        vt = draw(st.sampled_from([pa.float32(), pa.float16(), pa.int64(), pa.int8()]))
        out["data"] = encode_table(_table(x.astype(vt.to_pandas_dtype()), value_type=vt))
    elif kind == "width":
        width = draw(st.sampled_from([1, 3, 5, 8]))
        out["data"] = encode_table(_table(np.resize(x, (rows, width))))
    elif kind == "name":
        out["data"] = encode_table(_table(x, name=draw(st.sampled_from(["Y", "x", "", "X "]))))
    elif kind == "scalar":
        out["data"] = encode_table(pa.table({"X": x[:, 0]}))
    elif kind == "nulls":
        flat = pa.array([None if i % 5 == 0 else v for i, v in enumerate(x.reshape(-1))], type=pa.float64())
        out["data"] = encode_table(pa.table({"X": pa.FixedSizeListArray.from_arrays(flat, 4)}))
    elif kind == "nan":
        bad = x.copy()
        bad[draw(st.integers(0, rows - 1)), draw(st.integers(0, 3))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        out["data"] = encode_table(_table(bad))
    elif kind == "extension":
        ext = draw(st.sampled_from(["uuid", "json", "opaque", "tensor", "bool8"]))
        col: pa.Array
        if ext == "uuid":
            col = pa.array([uuid.uuid4().bytes for _ in range(rows)], type=pa.uuid())
        elif ext == "json":
            col = pa.array(['{"a": 1}'] * rows, type=pa.json_())
        elif ext == "opaque":
            t = pa.opaque(pa.binary(), "pickle", "evil")
            col = pa.ExtensionArray.from_storage(t, pa.array([b"cos\nsystem\n"] * rows))
        elif ext == "bool8":
            col = pa.ExtensionArray.from_storage(pa.bool8(), pa.array([1] * rows, type=pa.int8()))
        else:
            storage = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 4)
            col = pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.float64(), [2, 2]), storage)
        out["data"] = encode_table(pa.table({"X": col}))
    elif kind == "dictionary":
        out["data"] = encode_table(pa.table({"X": pa.array(["a", "b"] * rows)[:rows].dictionary_encode()}))
    elif kind == "nested":
        nested = draw(st.sampled_from(["list", "large_list", "struct", "map", "large_string", "binary"]))
        values = {
            "list": pa.array([list(r) for r in x]),
            "large_list": pa.array([list(r) for r in x], type=pa.large_list(pa.float64())),
            "struct": pa.array([{"a": float(r[0])} for r in x]),
            "map": pa.array([[("k", float(r[0]))] for r in x], type=pa.map_(pa.string(), pa.float64())),
            "large_string": pa.array(["s"] * rows, type=pa.large_string()),
            "binary": pa.array([b"b"] * rows),
        }[nested]
        out["data"] = encode_table(pa.table({"X": values}))
    elif kind == "compressed":
        out["data"] = _compressed(_table(x), draw(st.sampled_from(["lz4", "zstd"])))
    elif kind == "bomb":
        out["data"], out["rows"] = _bomb(), 4_000_000
    elif kind in ("huge_rows", "huge_buffer", "huge_metadata"):
        meta_start, rows_at, buffer_len_at = _batch_header_offsets(valid)
        huge = draw(st.sampled_from([2**31, 2**40, 2**62, -1]))
        if kind == "huge_rows":
            out["data"] = _patch(valid, rows_at, "<q", huge)
        elif kind == "huge_buffer":
            out["data"] = _patch(valid, buffer_len_at, "<q", huge)
        else:
            out["data"] = _patch(valid, meta_start - 4, "<i", draw(st.sampled_from([2**31 - 1, -5, 2**20])))
    elif kind == "row_mismatch":
        out["data"], out["rows"] = valid, rows + draw(st.sampled_from([1, 1000] if rows == 1 else [-1, 1, 1000]))
    elif kind == "empty":
        out["data"] = b""
    elif kind == "bad_base64":
        out["b64"] = draw(st.sampled_from(["!!!", "QUJD=", "not base64 at all", "AAAA" * 3 + "="]))
    elif kind == "oversize":
        out["key_bytes"] = encode_table(_table(np.ones((MAX_PAYLOAD // 32 + 100, 4))))
        out["rows"] = MAX_PAYLOAD // 32 + 100
    else:
        out["missing"] = True
    return out


def _decode_like_a_worker(case: dict[str, Any]) -> dict[str, np.ndarray]:
    if "b64" in case:
        data = TaskEnvelope("m", "1", (Item("j", 0, 1),), payload_b64=case["b64"]).inline_payload()
    else:
        data = case.get("data") or case.get("key_bytes") or b""
    table = decode_table(data, max_bytes=MAX_PAYLOAD, max_rows=case["rows"])
    if table.num_rows != case["rows"]:
        raise PayloadError("row count differs from the envelope")
    arrays = table_to_arrays(table, INPUTS)
    if not np.isfinite(arrays["X"]).all():
        raise PayloadError("NaN/inf")
    return arrays


@settings(max_examples=2000, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(payloads())
def test_decoding_any_generated_payload_raises_only_typed_errors(case: dict[str, Any]) -> None:
    if case.get("missing"):
        return
    started = time.monotonic()
    try:
        arrays = _decode_like_a_worker(case)
    except HetbatchError:
        pass
    else:
        # A benign mutation: it decodes to a well-formed input of the declared size.
        assert arrays["X"].shape == (case["rows"], 4)
        assert case["kind"] in ("bitflip", "truncate"), case["kind"]
    assert time.monotonic() - started < 30, "decoding must never hang"  # hang guard, not a speed test


def test_compressed_and_bomb_payloads_are_refused_before_inflating() -> None:
    rss = psutil.Process().memory_info().rss
    with pytest.raises(PayloadError, match="compressed"):
        decode_table(_bomb(), max_rows=4_000_000)
    assert psutil.Process().memory_info().rss - rss < 64 * 2**20
    with pytest.raises(PayloadTooLarge):
        decode_table(b"\0" * 2048, max_bytes=1024)


# -- through a real worker ------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, WorkerProcess, Built, Client]]:
    work = tmp_path_factory.mktemp("fuzz")
    server = RedisServer()
    built = sklearn_model(work / "fuzz-iris", "fuzz-iris", "iris", nan="reject")
    env = {"HETBATCH_MAX_PAYLOAD_BYTES": str(MAX_PAYLOAD), "HETBATCH_CONCURRENCY": "8"}
    worker = WorkerProcess(server.url, work, env=env)
    client = Client.from_url(server.url)
    register(client, built.directory)
    yield server, worker, built, client
    client.close()
    worker.stop()
    server.stop()


class _Tally:
    sent = 0
    errors = 0
    benign = 0
    by_type: dict[str, int] = {}
    latencies: list[float] = []
    processing: list[float] = []


def _send_wave(client: Client, cases: list[dict[str, Any]], built: Built) -> None:
    app = make_producer_app(client.settings.redis_url)
    reply = f"hb:reply:fuzz-{uuid.uuid4().hex}"
    spec = client.spec("fuzz-iris")
    sent_at: dict[str, float] = {}
    with app.producer_or_acquire() as producer:
        for case in cases:
            job_id = uuid.uuid4().hex
            fields: dict[str, Any] = {}
            if "b64" in case:
                fields["payload_b64"] = case["b64"]
            elif "key_bytes" in case or case.get("missing"):
                fields["payload_key"] = f"hb:in:{job_id}:0"
                if "key_bytes" in case:
                    client.redis.set(fields["payload_key"], case["key_bytes"], ex=600)
            else:
                fields["payload_b64"] = base64.b64encode(case["data"]).decode()
            env = TaskEnvelope(spec.name, spec.version, (Item(job_id, 0, case["rows"]),), reply_to=reply, **fields)
            sent_at[job_id] = time.monotonic()
            app.send_task(TASK_NAME, args=[env.to_dict()], queue=spec.queue, producer=producer, task_id=f"{job_id}.0")
            case["job_id"] = job_id
    app.close()
    results: dict[str, bytes] = {}
    arrived: dict[str, float] = {}
    deadline = time.monotonic() + 300
    while len(results) < len(cases):
        assert time.monotonic() < deadline, f"only {len(results)}/{len(cases)} results came back"
        popped = client.redis.blpop([reply], timeout=1)
        if popped is None:
            continue
        notice = decode_notice(popped[1])
        results[notice.job_id] = notice.result or client.redis.get(client.keys.result(notice.job_id, 0)) or b""
        _Tally.latencies.append(time.monotonic() - sent_at[notice.job_id])
        arrived[notice.job_id] = time.time()
    for case in cases:
        # From the worker starting the task to its result reaching the producer; an envelope
        # refused before the worker starts it (a payload name that is not the job's own) has
        # no attempt and is answered at once.
        attempts = client.ledger.attempts(case["job_id"])
        if attempts:
            _Tally.processing.append(arrived[case["job_id"]] - attempts[0].started)
        stored = client.redis.get(client.keys.result(case["job_id"], 0))
        assert stored is not None
        decoded = decode_result(results[case["job_id"]])
        if isinstance(decoded, pa.Table):
            x = _decode_like_a_worker(case)["X"]  # a benign mutation: the model's own answer
            np.testing.assert_array_equal(column(decoded, "label"), built.model.predict(x))
            _Tally.benign += 1
        else:
            assert decoded.type in ERROR_TYPES, (case["kind"], decoded)
            assert decoded.message, case["kind"]
            _Tally.errors += 1
            _Tally.by_type[decoded.type] = _Tally.by_type.get(decoded.type, 0) + 1
    _Tally.sent += len(cases)


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.lists(payloads(), min_size=100, max_size=100))
def _fuzz_waves(fuzz_env: tuple[RedisServer, WorkerProcess, Built, Client], cases: list[dict[str, Any]]) -> None:
    _server, worker, built, client = fuzz_env
    _send_wave(client, cases, built)
    assert worker.alive(), worker.output()[-3000:]


def test_2000_malformed_payloads_each_get_a_clear_error_and_the_worker_stays_up(
    fuzz_env: tuple[RedisServer, WorkerProcess, Built, Client],
) -> None:
    _server, worker, built, client = fuzz_env
    proc = psutil.Process(worker.proc.pid)
    _send_wave(client, [{"kind": "warmup", "rows": 4, "data": encode_table(_table(_IRIS[:4]))}], built)
    rss_before = proc.memory_info().rss
    _Tally.latencies.clear()
    _Tally.processing.clear()
    _fuzz_waves(fuzz_env)
    rss_after = proc.memory_info().rss
    summary = {
        "payloads": _Tally.sent - 1,
        "error_results": _Tally.errors,
        "benign_mutations_predicted": _Tally.benign - 1,
        "by_type": _Tally.by_type,
        "max_wave_latency_s": round(max(_Tally.latencies), 3),
        "max_processing_s": round(max(_Tally.processing), 3),
        "p99_processing_s": round(float(np.percentile(_Tally.processing, 99)), 3),
        "within_2_s": sum(p <= 2.0 for p in _Tally.processing),
        "rss_before_mib": rss_before // 2**20,
        "rss_after_mib": rss_after // 2**20,
        "worker_alive": worker.alive(),
    }
    print(json.dumps(summary))
    Path(worker.log.parent / "fuzz-summary.json").write_text(json.dumps(summary))
    assert worker.alive()
    assert _Tally.sent - 1 >= 2000
    assert rss_after - rss_before < 256 * 2**20, summary


def test_nan_policy_reject_and_pass(fuzz_env: tuple[RedisServer, WorkerProcess, Built, Client], tmp_path: Path) -> None:
    _server, _worker, built, client = fuzz_env
    x = built.X[:6].copy()
    x[2, 1] = np.nan
    with pytest.raises(HetbatchError, match="NaN or inf"):
        client.predict("fuzz-iris", x, timeout_s=60)
    passing = sklearn_model(tmp_path / "nan-pass", "nan-pass-iris", "iris", nan="pass")
    register(client, passing.directory)
    out = client.predict("nan-pass-iris", x, timeout_s=60)
    np.testing.assert_array_equal(column(out, "label"), passing.model.predict(x))


def test_oversize_payloads_are_refused_by_the_producer(
    fuzz_env: tuple[RedisServer, WorkerProcess, Built, Client],
) -> None:
    server, _worker, built, _client = fuzz_env
    with (
        Client(ClientSettings.from_env(redis_url=server.url, max_payload_bytes=1024)) as small,
        pytest.raises(PayloadTooLarge, match="max_payload_bytes=1024"),
    ):
        small.submit("fuzz-iris", np.tile(built.X, (2, 1)))
