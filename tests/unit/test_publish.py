"""Our LPUSHed task frame matches what kombu's own send_task stores in Redis."""

from __future__ import annotations

import json

import redis

from hetbatch.producers.client import make_producer_app
from hetbatch.producers.protocol.kombu import celery_message, priority_list
from hetbatch.producers.protocol.wire import TASK_NAME


def _frames(url: str, key: str) -> list[dict[str, object]]:
    return [json.loads(m) for m in redis.Redis.from_url(url).lrange(key, 0, -1)]


def test_the_frame_has_every_field_kombu_writes(redis_url: str) -> None:
    app = make_producer_app(redis_url)
    app.send_task(TASK_NAME, args=[{"a": 1}], queue="frame.test", priority=5)
    app.close()
    theirs = _frames(redis_url, priority_list("frame.test", 5))[0]
    ours = json.loads(celery_message(TASK_NAME, [{"a": 1}], "frame.test", 5, "a=1"))
    assert set(ours) == set(theirs)
    assert set(theirs["headers"]) - set(ours["headers"]) <= {"replaced_task_nesting", "stamped_headers", "stamps"}
    assert set(theirs["properties"]) - set(ours["properties"]) <= {"reply_to"}
    assert ours["body"] == theirs["body"]
    assert ours["properties"]["delivery_info"] == theirs["properties"]["delivery_info"]
    redis.Redis.from_url(redis_url).delete(priority_list("frame.test", 5))


def test_priorities_map_to_kombus_lists() -> None:
    assert priority_list("onnx.cpu", 0) == "onnx.cpu"
    assert priority_list("onnx.cpu", 9) == "onnx.cpu:9"


def test_error_messages_name_the_redis_without_credentials_also_through_sentinel() -> None:
    from hetbatch.producers.protocol.connect import connect
    from hetbatch.producers.publisher import safe_url

    assert safe_url(connect("redis://user:s3cret@h:7/3")) == "h:7/3"
    assert safe_url(connect("sentinel://:s3cret@127.0.0.1:1/2?master_name=grp")) == "sentinel:grp/2"
