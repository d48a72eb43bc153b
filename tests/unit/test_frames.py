"""Pure checks of the frame guard (``producers.protocol.frames``) and of the job ids a raw
dead letter records (``worker.ops.dlq.named_jobs``): what the e2e tests push at a worker."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from hetbatch.producers.protocol.frames import frame_problem
from hetbatch.producers.protocol.kombu import celery_message
from hetbatch.producers.protocol.wire import TASK_NAME
from hetbatch.worker.ops.dlq import named_jobs

JOB = "0123456789abcdef0123456789abcdef"
ENV = {"v": 1, "model": "m", "version": "1", "items": [[JOB, 0, 3]], "payload_b64": ""}


def _message(embed: Any = None, **body_changes: Any) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(celery_message(TASK_NAME, [ENV], "q", 0, ""))
    if embed is not None:
        message["body"] = base64.b64encode(json.dumps([[ENV], {}, embed]).encode()).decode()
    return message


def test_a_frame_as_hetbatch_writes_it_passes() -> None:
    assert frame_problem(_message(), task=True) is None


@pytest.mark.parametrize(
    "embed",
    [{"callbacks": "x"}, {"chain": [{"task": TASK_NAME}]}, {"chord": {}}, {"errbacks": []}, {"link": None}],
)
def test_an_embed_that_sets_anything_is_refused(embed: dict[str, Any]) -> None:
    assert "embed sets" in (frame_problem(_message(embed), task=True) or "")


def test_a_frame_nested_deeper_than_any_of_ours_is_refused() -> None:
    message = _message()
    message["properties"]["delivery_info"]["x"] = json.loads("[" * 900 + "]" * 900)
    assert "nested" in (frame_problem(message, task=False) or "")


@pytest.mark.parametrize(
    ("raw", "jobs"),
    [
        (json.dumps({**ENV, "version": "V" * 200_000}).encode(), [JOB]),  # a lane entry, cut when kept
        (json.dumps(_message({"callbacks": "x"})).encode(), [JOB]),  # a frame: the envelope in its body
        (json.dumps({**ENV, "items": [["bad:id", 0, 3]]}).encode(), []),
        (b"[" * 100_000, []),
        (b"garbage", []),
        (json.dumps({"body": "!!!", "properties": {"body_encoding": "base64"}}).encode(), []),
    ],
)
def test_a_raw_dead_letter_records_the_jobs_it_names(raw: bytes, jobs: list[str]) -> None:
    assert named_jobs(raw) == jobs
