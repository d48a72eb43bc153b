"""Whether kombu's ``Message`` and Celery's ``Request`` can take a decoded kombu frame.

Anyone who can LPUSH onto a queue writes frames; every check below stands for a place
where kombu or Celery would raise out of the worker's consumer and end the process
("Unrecoverable error"). ``producers.protocol.kombu``'s patch moves a refused frame aside.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from hetbatch.producers.protocol.wire import FUSE_TASK_NAME, TASK_NAME

__all__ = ["frame_problem"]

# Celery task headers hetbatch's frames carry, and the types each may have.
_TEXT_HEADERS = ("lang", "shadow", "group", "root_id", "parent_id", "argsrepr", "kwargsrepr", "origin")
_MAX_TASK_ID = 256
# Celery's embed (the body's third element): the canvas options a task passes on when it
# ends. ``celery_message`` writes them all None, and hetbatch never uses them: set, they
# make the worker publish tasks of the frame's choosing (or raise after the task, so the
# message is never acked and comes back forever), so anything else is refused.
_EMBED_KEYS = frozenset({"callbacks", "errbacks", "chain", "chord"})
# JSON nesting a frame and a task body may have. hetbatch's are 3 and 5 deep (an ensemble
# continuation a few more); kombu re-encodes a delivered frame (into the unacked hash) from
# deeper in the stack than it decoded it, so a frame nested just under the decoder's limit
# raised RecursionError there and ended the worker.
_MAX_DEPTH = 32


def frame_problem(message: Any, *, task: bool) -> str | None:
    """Why kombu (any queue) or Celery (``task``: a queue of hetbatch tasks) could not
    take a decoded frame, or None when they can: every check here stands for a place
    where kombu's ``Message`` or Celery's ``Request`` would raise out of the consumer."""
    if not isinstance(message, dict):
        return f"the frame is a JSON {type(message).__name__}, not an object"
    if _deeper_than(message, _MAX_DEPTH):
        return f"the frame is nested more than {_MAX_DEPTH} levels deep"
    props = message.get("properties")
    if not isinstance(props, dict):
        return "the frame has no properties object"
    if not isinstance(props.get("delivery_tag"), str) or not props["delivery_tag"]:
        return "the frame has no delivery_tag"
    if not isinstance(props.get("delivery_info", {}), dict):
        return "the frame's delivery_info is not an object"
    headers = message.get("headers")
    if headers is not None and not isinstance(headers, dict):
        return "the frame's headers are not an object"
    body = message.get("body")
    if body and not isinstance(body, str):
        return f"the frame's body is a {type(body).__name__}, not text"
    encoding = props.get("body_encoding")
    if encoding not in (None, "base64"):
        return f"unknown body_encoding {encoding!r}"
    data = (body or "").encode()
    if body and encoding == "base64":
        try:
            data = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError) as exc:
            return f"the body is not valid base64: {exc}"
    if not task:
        return None
    if headers is None:
        return "a task frame without headers"
    return _task_problem(message, headers, data)


def _task_problem(message: dict[str, Any], headers: dict[str, Any], data: bytes) -> str | None:
    if headers.get("task") not in (TASK_NAME, FUSE_TASK_NAME):
        return f"unknown task {str(headers.get('task'))[:100]!r}"
    task_id = headers.get("id")
    if not isinstance(task_id, str) or not 0 < len(task_id) <= _MAX_TASK_ID:
        return "the task id is not a string of 1-256 characters"
    for name in _TEXT_HEADERS:
        if headers.get(name) is not None and not isinstance(headers[name], str):
            return f"header {name!r} is not text"
    if headers.get("eta") is not None or headers.get("expires") is not None:
        return "hetbatch tasks carry no eta or expires"  # deadlines travel in the envelope
    limits = headers.get("timelimit")
    if limits is not None and not (
        isinstance(limits, list)
        and len(limits) == 2
        and all(v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in limits)
    ):
        return "header 'timelimit' is not [hard, soft]"
    retries = headers.get("retries")
    if retries is not None and (not isinstance(retries, int) or isinstance(retries, bool)):
        return "header 'retries' is not an integer"
    if message.get("content-type") != "application/json":
        return f"content-type {str(message.get('content-type'))[:60]!r}, not application/json"
    if message.get("content-encoding") not in (None, "utf-8"):
        return f"content-encoding {str(message.get('content-encoding'))[:60]!r}, not utf-8"
    try:
        args = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return f"the body is not JSON: {exc}"
    if not (isinstance(args, list) and len(args) == 3):
        return "the body is not [args, kwargs, embed]"
    if _deeper_than(args, _MAX_DEPTH):
        return f"the body is nested more than {_MAX_DEPTH} levels deep"
    if not (isinstance(args[0], list) and len(args[0]) == 1):
        return "a hetbatch task takes exactly one argument"
    if args[1] != {} or not isinstance(args[2], dict | None):
        return "a hetbatch task takes no keyword arguments, and embed must be an object"
    embed = args[2] or {}
    stray = sorted(str(k)[:40] for k, v in embed.items() if k not in _EMBED_KEYS or v is not None)
    if stray:
        return f"embed sets {', '.join(stray[:8])}: hetbatch tasks take no callbacks, errbacks, chain or chord"
    return None


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether decoded JSON ``value`` nests lists and objects more than ``limit`` deep;
    iterative, so any depth the decoder took is measured without recursion."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False
