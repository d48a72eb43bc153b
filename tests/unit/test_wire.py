"""The wire contract alone: envelopes, the Arrow codec, results and notices."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from hetbatch.producers.errors import PayloadError, PayloadTooLarge, RemoteError
from hetbatch.producers.protocol.keys import Keys
from hetbatch.producers.protocol.wire import (
    Item,
    Notice,
    TaskEnvelope,
    decode_notice,
    decode_result,
    decode_table,
    encode_error,
    encode_notice,
    encode_result,
    encode_table,
)


def test_an_envelope_survives_json() -> None:
    env = TaskEnvelope(
        "m",
        "3",
        (Item("j1", 0, 5), Item("j2", 0, 7)),
        payload_key=Keys().input("j1", 0),
        reply_to=Keys().reply("c"),
        deadline=12.5,
    )
    back = TaskEnvelope.from_dict(json.loads(json.dumps(env.to_dict())))
    assert back == env
    assert back.rows == 12
    assert "rows=12" in env.describe() and "hb:in" not in env.describe()


@pytest.mark.parametrize(
    "body",
    [
        None,
        "text",
        {"v": 2, "model": "m", "version": "1", "items": [["j", 0, 1]], "payload_key": "k"},
        {"v": 1, "model": "m", "version": "1", "items": [], "payload_key": "k"},
        {"v": 1, "model": "m", "version": "1", "items": [["j", -1, 1]], "payload_key": "k"},
        {"v": 1, "model": "m", "version": "1", "items": [["j", 0, "1"]], "payload_key": "k"},
        {"v": 1, "model": "m", "version": "1", "items": [["j", 0, 1]]},
        {"v": 1, "model": "m", "version": "1", "items": [["j", 0, 1]], "payload_key": "k", "payload_b64": "AA=="},
        {"v": 1, "model": "", "version": "1", "items": [["j", 0, 1]], "payload_key": "k"},
    ],
)
def test_malformed_envelopes_raise_payload_error(body: object) -> None:
    with pytest.raises(PayloadError):
        TaskEnvelope.from_dict(body)


def test_arrow_round_trip_is_zero_copy_for_tensors() -> None:
    x = np.arange(12, dtype=np.float32)
    table = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x), 3)})
    data = encode_table(table)
    back = decode_table(data)
    assert back.equals(table)
    values = back.column("x").chunk(0).flatten().to_numpy()
    assert not values.flags.owndata  # a view into the received bytes


@pytest.mark.parametrize("data", [b"", b"\x00" * 7, b"garbage" * 10])
def test_garbage_bytes_raise_payload_error(data: bytes) -> None:
    with pytest.raises(PayloadError):
        decode_table(data)


def test_truncated_streams_raise_payload_error() -> None:
    data = encode_table(pa.table({"a": np.arange(100)}))
    for cut in (1, 8, len(data) // 2, len(data) - 1):
        with pytest.raises(PayloadError):
            decode_table(data[:cut])


def test_oversize_payloads_are_refused_before_decoding() -> None:
    with pytest.raises(PayloadTooLarge, match="max_payload_bytes=10"):
        decode_table(b"x" * 11, max_bytes=10)


def test_results_and_errors_round_trip() -> None:
    table = pa.table({"y": [1, 2]})
    assert decode_result(encode_result(table)).equals(table)  # type: ignore[union-attr]
    err = RemoteError("SchemaMismatch", "bad", {"column": "x"})
    assert decode_result(encode_error(err)) == err
    with pytest.raises(PayloadError):
        decode_result(b"Znope")


def test_notices_carry_small_results_inline() -> None:
    n = Notice("job", 3, b"A\n\x00bytes")
    assert decode_notice(encode_notice(n)) == n
    assert decode_notice(encode_notice(Notice("job", 0))) == Notice("job", 0, None)


def test_a_pack_envelope_carries_its_sizes_not_its_job_ids() -> None:
    items = tuple(Item(f"p1-{i}", 0, rows) for i, rows in enumerate([3, 0, 5]))
    env = TaskEnvelope("m", "1", items, payload_key="k", pack="p1")
    body = env.to_dict()
    assert "items" not in body and body["sizes"] == [3, 0, 5]
    assert TaskEnvelope.from_dict(json.loads(json.dumps(body))) == env
    for bad in ([1, -1], [1, "2"], [True], "3"):
        with pytest.raises(PayloadError):
            TaskEnvelope.from_dict({**body, "sizes": bad})
    with pytest.raises(PayloadError):
        TaskEnvelope.from_dict({k: v for k, v in body.items() if k != "pack"})
