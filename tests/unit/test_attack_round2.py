"""The pure pieces of tests/e2e/test_attack_round2.py's fixes, without Redis: URLs hidden
for error lines whatever their shape, sentinel URLs that urllib cannot parse refused with
ConfigError, a reader of parts that stops at the first bad one, and a ledger body the
worker refuses that still stands for its jobs."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from hetbatch.producers.errors import ConfigError, JobFailed, JobLost, PayloadError
from hetbatch.producers.protocol import parts, tracing
from hetbatch.producers.protocol.ensemble import Continuation, refused_job
from hetbatch.producers.protocol.keys import Keys
from hetbatch.producers.protocol.sentinel import SentinelUrl
from hetbatch.producers.protocol.wire import Item, TaskEnvelope
from hetbatch.producers.steps import Mget, join_steps, run
from hetbatch.worker.connection import redacted
from hetbatch.worker.ops.reconciler import _envelope
from hetbatch.worker.settings import WorkerSettings

HIDDEN = [
    ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
    ("rediss://user:pw@h:6380/1?ssl_cert_reqs=none", "rediss://user:***@h:6380/1?ssl_cert_reqs=none"),
    ("redis://user@h:6379/0", "redis://user@h:6379/0"),
    ("redis://h:6379/0", "redis://h:6379/0"),
    # urllib raised ValueError on these, inside the code that reports the URL as wrong
    ("redis://:pw@h:99999/0", "redis://:***@h:99999/0"),
    ("redis://:pw@[::1/0", "redis://:***@[::1/0"),
    # every sentinel part, and the sentinels' own password in the query
    (
        "sentinel://u:pw@a:26379;sentinel://u:pw@b:26379/0?master_name=m&sentinel_password=sp",
        "sentinel://u:***@a:26379;sentinel://u:***@b:26379/0?master_name=m&sentinel_password=***",
    ),
    ("redis://h/0?password=pw", "redis://h/0?password=***"),
    ("redis://:p/w@d@h:1/0", "redis://:***@h:1/0"),  # an unescaped / or @ in the password
]


@pytest.mark.parametrize(("url", "shown"), HIDDEN)
def test_redacted_hides_every_password_and_never_raises(url: str, shown: str) -> None:
    assert redacted(url) == shown


@pytest.mark.parametrize(
    "url",
    ["sentinel://h:99999/0?master_name=m", "sentinel://[::1/0?master_name=m", "sentinel://h:port/0?master_name=m"],
)
def test_a_sentinel_url_urllib_cannot_read_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match="part 1 is not sentinel://host:port"):
        SentinelUrl.parse(url)


def test_a_reader_of_parts_stops_at_the_first_missing_or_wrong_part() -> None:
    keys = Keys("t")
    manifest = b"M[" + b",".join([str(parts.MAX_PART_BYTES).encode()] * parts.MAX_PARTS) + b"]"
    for first, error, words in ((None, JobLost, "part 0 of 65536"), (b"x", JobFailed, "part 0 as 536870912 bytes")):
        asked: list[list[str]] = []

        def mget(step: Any, first: bytes | None = first, asked: list[list[str]] = asked) -> Any:
            assert isinstance(step, Mget)
            asked.append(step.keys)
            return [first if k.endswith(":0") else None for k in step.keys]

        with pytest.raises(error) as caught:
            run(join_steps(keys, "job-1", "job-1", {0: manifest}), mget)
        assert caught.value.job_id == "job-1" and words in str(caught.value)
        assert asked == [[keys.result_part("job-1", 0, 0)]]  # one round trip, not 65,536


def test_a_ledger_body_the_worker_refuses_still_stands_for_its_jobs() -> None:
    body = TaskEnvelope("m", "1", (Item("job-9", 2, 4),), payload_b64="").to_dict()
    assert _envelope(body).items == (Item("job-9", 2, 4),)
    body["trace"] = ["not", "a", "traceparent"]
    refused = _envelope(body)  # what the reconciler republishes: the worker answers job-9 with its refusal
    assert [(i.job_id, i.chunk) for i in refused.units] == [("job-9", 2)]
    with pytest.raises(PayloadError):
        _envelope({"trace": 1})  # names no job: forgotten, as before


def test_a_refused_continuation_still_names_its_ensemble_job_when_it_can() -> None:
    good = Continuation("e@1", "job-7", 3, 0, (0, 1), 5, reply_to=Keys().reply("client-1")).to_dict()
    with pytest.raises(PayloadError, match="trace"):
        Continuation.from_dict({**good, "trace": "00-" + "z" * 100})
    assert refused_job({**good, "trace": 5}) == ("job-7", 3, Keys().reply("client-1"))
    assert refused_job({**good, "reply_to": "hb:models"}) == ("job-7", 3, None)  # never a key that is not a reply list
    assert refused_job({**good, "job_id": "../x"}) is None
    assert refused_job({**good, "chunk": -1}) is None
    assert refused_job(["job-7"]) is None


@pytest.mark.parametrize("size", [0, -1])
def test_a_worker_refuses_a_max_result_bytes_below_one_at_start(size: int) -> None:
    """It was accepted, and every result's store then raised (ZeroDivisionError at 0):
    no job got an answer, each waited for its producer's timeout."""
    with pytest.raises(ValueError, match="max_result_bytes must be at least 1"):
        WorkerSettings(max_result_bytes=size)
    assert WorkerSettings(max_result_bytes=1).max_result_bytes == 1


def test_tracing_on_without_opentelemetry_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # import opentelemetry.* fails
    monkeypatch.setitem(sys.modules, "opentelemetry.trace", None)
    monkeypatch.setattr(tracing, "_on", False)
    with pytest.raises(ConfigError, match=r"hetbatch\[otel\]"):
        tracing.configure(True)
    assert not tracing.enabled()
