"""Everything hetbatch knows about kombu's Redis transport and Celery's message layout.

The only library module that imports kombu. It holds
- the queue layout: one Redis list per priority step (``<queue>`` for step 0,
  ``<queue>:<n>`` for the others), the ``unacked`` hash and ``unacked_index`` zset of
  delivered, unacknowledged messages, and the transport options both apps share;
- the task frame: ``send_task`` costs a round trip per message plus ~0.3 ms of Python;
  writing the same Celery protocol-2 message with LPUSH lets a job's payload, its
  ledger record and its task message share one pipelined round trip. ``celery_message``
  builds the frame kombu's Redis transport stores (checked by a test against
  ``send_task``'s own output), and workers consume it through the ordinary consumer;
- reading frames back (queue depths, task ids in queues and in the unacked hash, the
  envelope inside a frame) for status, retention and the reconciler;
- the worker's one patch of kombu (``patch_worker_transport``), which moves aside every
  message ``producers.protocol.frames.frame_problem`` finds kombu or Celery cannot take.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, cast

import redis
from kombu import Exchange, Queue
from kombu.transport import redis as kombu_redis

from hetbatch.producers.protocol.frames import frame_problem
from hetbatch.producers.protocol.keys import lane_list
from hetbatch.producers.protocol.scripts import script

__all__ = [
    "LANE_PRIORITY",
    "PRIORITY_SEP",
    "PRIORITY_STEPS",
    "TRANSPORT_OPTIONS",
    "DeadLetter",
    "celery_message",
    "frame_envelope",
    "frame_task_id",
    "guarded_strategy",
    "patch_worker_transport",
    "priority_list",
    "priority_lists",
    "queue_depths",
    "queue_reads",
    "read_task_ids",
    "renew_unacked",
    "task_queues",
    "unacked_counts",
    "worker_transport_options",
]

PRIORITY_SEP = ":"
PRIORITY_STEPS = list(range(10))
# Shared by both Celery apps: priorities are separate Redis lists, 0 served first.
TRANSPORT_OPTIONS: dict[str, Any] = {
    "priority_steps": PRIORITY_STEPS,
    "sep": PRIORITY_SEP,
    "queue_order_strategy": "priority",
}
# The lane carries normal-priority jobs only: high and low ones keep Celery's priority lists.
LANE_PRIORITY = 5
_UNACKED = "unacked"  # hash: delivery tag -> JSON [frame, exchange, routing key]
_UNACKED_INDEX = "unacked_index"  # zset: delivery tag -> delivery time (unix s)
log = logging.getLogger(__name__)
# The headers of Celery 5's send_task that are the same in every hetbatch task message.
_HEADERS = {"shadow": None, "eta": None, "expires": None, "group": None, "group_index": None, "retries": 0,
            "timelimit": [None, None], "parent_id": None, "kwargsrepr": "{}", "ignore_result": True,
            "origin": f"{os.getpid()}@{socket.gethostname()}"}  # fmt: skip
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


# -- layout ----------------------------------------------------------------------


def priority_list(queue: str, priority: int) -> str:
    """The Redis list kombu reads for ``queue`` at ``priority`` (0 is the bare name)."""
    return f"{queue}{PRIORITY_SEP}{priority}" if priority else queue


def priority_lists(queue: str) -> list[str]:
    """The Redis lists that hold ``queue``'s waiting messages, highest priority first."""
    return [priority_list(queue, step) for step in PRIORITY_STEPS]


def task_queues(names: Iterable[str]) -> list[Queue]:
    """kombu queue declarations for a worker consuming ``names`` (a direct exchange each)."""
    return [Queue(q, Exchange(q), routing_key=q) for q in names]


def worker_transport_options(*, visibility_timeout_s: int, restore_interval_s: int) -> dict[str, Any]:
    """The worker's ``broker_transport_options``: redelivery of unacked messages after
    ``visibility_timeout_s``, looked for every ``restore_interval_s`` (seconds) by one
    worker at a time (the restore mutex outlives a few intervals)."""
    return {
        "visibility_timeout": visibility_timeout_s,
        "unacked_restore_interval": restore_interval_s,
        "unacked_restore_throttle": 1,
        "unacked_mutex_expire": max(10, restore_interval_s * 4),
        **TRANSPORT_OPTIONS,
    }


# -- the frame -------------------------------------------------------------------


def celery_message(
    task: str, args: list[Any], queue: str, priority: int, argsrepr: str, task_id: str | None = None
) -> bytes:
    """A JSON Celery protocol-2 message for kombu's Redis transport."""
    task_id = task_id or str(uuid.uuid4())
    body = base64.b64encode(json.dumps([args, {}, _EMBED]).encode()).decode()
    headers = {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "argsrepr": argsrepr, **_HEADERS}
    properties = {"correlation_id": task_id, "delivery_mode": 2, "priority": priority, "body_encoding": "base64",
                  "delivery_info": {"exchange": "", "routing_key": queue},
                  "delivery_tag": str(uuid.uuid4())}  # fmt: skip
    message = {"body": body, "content-encoding": "utf-8", "content-type": "application/json", "headers": headers,
               "properties": properties}  # fmt: skip
    return json.dumps(message).encode()


def frame_task_id(raw: bytes, unacked: bool = False) -> str:
    """The Celery task id in a frame ("" when unreadable); ``unacked``: an entry of the
    unacked hash (``[frame, exchange, routing key]``)."""
    try:
        message = json.loads(raw)
        return str((message[0] if unacked else message)["headers"]["id"])
    except (ValueError, KeyError, TypeError, IndexError, RecursionError):
        return ""


def frame_envelope(raw: bytes) -> dict[str, Any] | None:
    """The first task argument in a frame (a hetbatch task's envelope) when it is an
    object with a ``model`` field; None for anything else."""
    try:
        message = json.loads(raw)
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        env = json.loads(body)[0][0]
        return cast(dict[str, Any], env) if isinstance(env, dict) and "model" in env else None
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, binascii.Error, RecursionError):
        return None


# -- reading queues --------------------------------------------------------------


def queue_depths(client: redis.Redis, queues: Iterable[str]) -> dict[str, dict[int, int]]:
    """Waiting messages per queue and priority step (one LLEN per list, one round trip);
    lane jobs count as ``LANE_PRIORITY`` ones, which they are."""
    names = list(queues)
    pipe = client.pipeline(transaction=False)
    for queue in names:
        for key in [*priority_lists(queue), lane_list(queue)]:
            pipe.llen(key)
    counts = iter(cast(list[int], pipe.execute()))
    depths = {}
    for queue in names:
        depths[queue] = {step: int(next(counts)) for step in PRIORITY_STEPS}
        depths[queue][LANE_PRIORITY] += int(next(counts))
    return depths


def queue_reads(pipe: Any, queues: Iterable[str]) -> int:
    """Queue (on ``pipe``) reads of every message waiting in ``queues`` and of every
    delivered, unacked message; returns how many replies they add (for ``read_task_ids``)."""
    names = sorted(queues)
    for queue in names:
        for key in priority_lists(queue):
            pipe.lrange(key, 0, -1)
    pipe.hvals(_UNACKED)
    return len(names) * len(PRIORITY_STEPS) + 1


def read_task_ids(replies: Sequence[Any]) -> set[str]:
    """Task ids of the frames in the replies of ``queue_reads`` (unreadable ones left out)."""
    found = {frame_task_id(raw) for chunk in replies[:-1] for raw in chunk}
    found |= {frame_task_id(raw, unacked=True) for raw in replies[-1]}
    found.discard("")
    return found


def unacked_counts(client: redis.Redis) -> dict[str, int]:
    """Delivered, unacknowledged messages per queue: those a worker prefetched or runs,
    and a dead worker's until kombu restores them. Counted inside Redis
    (``lua/unacked_queues.lua``), so frames never cross the network; costs Redis one
    pass over the unacked hash (about 1 microsecond per message)."""
    flat = cast(list[Any], script(client, "unacked_queues")(keys=[_UNACKED]))
    pairs = zip(flat[::2], flat[1::2], strict=True)
    return {(q.decode() if isinstance(q, bytes) else str(q)): int(n) for q, n in pairs}


def renew_unacked(client: redis.Redis, delivery_tags: dict[str, float]) -> int:
    """Set the delivery time (unix s) of messages still unacked, so kombu does not
    redeliver them yet; returns how many were renewed. XX: an acked or restored message
    must not come back."""
    if not delivery_tags:
        return 0
    return cast(int, client.zadd(_UNACKED_INDEX, cast(Any, delivery_tags), xx=True, ch=True))


# -- the worker's patch ----------------------------------------------------------

# (raw bytes, reason, queue): moves an undecodable message aside (worker.ops.dlq.bury_raw).
DeadLetter = Callable[[bytes, str, str], object]


class _Guard:
    def __init__(self) -> None:
        self.queues: frozenset[str] = frozenset()
        self.dead_letter: DeadLetter | None = None

    def move_aside(self, raw: bytes, reason: str, queue: str) -> None:
        """Dead-letter ``raw``, or at least log it: never raise into kombu's event loop."""
        log.error("moved an undecodable message of queue %r aside: %s", queue, reason[:300])
        if self.dead_letter is None or queue not in self.queues:
            return  # a control (pidbox) message: nobody waits on it
        try:
            self.dead_letter(raw, reason, queue)
        except Exception as exc:  # Redis down: the message is dropped, the worker goes on
            log.error("could not dead-letter it (%s); it is dropped", exc)


_GUARD = _Guard()


class _Undecodable:
    """The patched ``loads``'s answer to text that is not JSON, which ``_deliver`` moves aside;
    unpacking it raises ``ValueError`` as ``loads`` did (kombu's restore paths use ``loads``)."""

    __slots__ = ("reason", "text")

    def __init__(self, text: str, reason: str) -> None:
        self.text = text
        self.reason = reason

    def __iter__(self) -> Iterator[Any]:
        raise ValueError(self.reason)


_kombu_loads = kombu_redis.loads
_kombu_deliver = kombu_redis.Transport._deliver
_create_client = kombu_redis.Channel._create_client


def _loads(text: Any) -> Any:
    try:
        return _kombu_loads(text)
    except (ValueError, TypeError, RecursionError) as exc:  # b"[" * 100_000 nests past the stack
        shown = text if isinstance(text, str) else repr(text)
        return _Undecodable(shown, f"not a JSON kombu frame: {exc}")


def _deliver(self: Any, message: Any, queue: str) -> Any:
    # Every message popped from a list reaches the consumer through here (BRPOP, RPOP
    # and fanout alike): one that kombu's Message or Celery's request cannot take is
    # moved aside before either sees it. Without this, one LPUSH of "garbage" onto a
    # queue raised out of the event loop and ended the worker ("Unrecoverable error").
    if isinstance(message, _Undecodable):
        _GUARD.move_aside(message.text.encode("utf-8", "replace"), message.reason, queue)
        return None
    problem = frame_problem(message, task=queue in _GUARD.queues)
    if problem is not None:
        _GUARD.move_aside(_dump(message), problem, queue)
        return None
    return _kombu_deliver(self, message, queue)


def _dump(message: Any) -> bytes:
    try:
        return json.dumps(message, default=repr).encode()
    except (ValueError, TypeError, RecursionError):
        pass
    try:
        return repr(message)[: 1 << 20].encode("utf-8", "replace")
    except RecursionError:  # nested past the stack: repr recurses too
        return b"<a frame nested too deep to show>"


def _reused_client(self: Any, asynchronous: bool = False) -> Any:
    # kombu builds a new redis-py client object for every delivered message and every
    # ack (``Channel.conn_or_acquire``); redis-py 8's constructor sets up a table of
    # some two hundred response callbacks, and a profile of a worker under many small
    # tasks found 15% of its samples there. A redis-py client holds no connection of its
    # own and is thread-safe, so one per connection pool is reused.
    if (self._async_pool if asynchronous else self._pool) is None and self.connection.client is None:
        # Celery 5.7 closes a lost connection twice (collect(), then close()); the second
        # close retries restoring unacked messages on a transport kombu has detached, and
        # building a pool there raised AttributeError: "Unrecoverable error", a worker that
        # never consumed again. A connection error lets the close finish and the consumer
        # reconnect; the messages come back after the visibility timeout.
        raise redis.ConnectionError("the broker connection is closed")
    if asynchronous:
        return _create_client(self, asynchronous)
    client = self.__dict__.get("_hetbatch_client")
    if client is None or client.connection_pool is not self.pool:  # a new pool after a reconnect
        client = self._hetbatch_client = _create_client(self, False)
    return client


# What a client on kombu's default options (``celery -b URL inspect``) joins a binding's
# routing key, pattern and queue with; ours use PRIORITY_SEP.
_DEFAULT_SEP: str = kombu_redis.Channel.sep


def _any_sep_table(self: Any, exchange: str) -> list[tuple[str, ...]]:
    # A worker sends each control reply through the binding table its client wrote
    # (``reply.celery.pidbox``). kombu splits every member on this channel's ``sep``, so
    # one member from a default client failed the whole lookup (ValueError): the plain
    # Celery CLI got "No nodes replied", and while it ran no other client got replies.
    with self.conn_or_acquire() as client:
        raw = client.smembers(self.keyprefix_queue % exchange)
    members = [m.decode() if isinstance(m, bytes) else m for m in raw]
    parts = [m.split(_DEFAULT_SEP if _DEFAULT_SEP in m else self.sep) for m in members]
    return [tuple(p) for p in parts if len(p) == 3]  # a malformed member must not block the others


def patch_worker_transport(task_queues: Iterable[str] = (), dead_letter: DeadLetter | None = None) -> None:
    """Patch kombu's Redis transport in this worker process (idempotent): one redis-py
    client per connection pool, and every message of ``task_queues`` that kombu or
    Celery could not take (``frame_problem``) handed to ``dead_letter`` instead, so the
    worker goes on. The message is off its list already (popped), so nothing is acked."""
    kombu_redis.Channel._create_client = _reused_client
    kombu_redis.Channel.get_table = _any_sep_table  # binding members in either separator
    kombu_redis.loads = _loads
    kombu_redis.Transport._deliver = _deliver
    _GUARD.queues = frozenset(task_queues)
    _GUARD.dead_letter = dead_letter


def guarded_strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
    """Celery's default task strategy, except that a message it cannot turn into a
    request (a header ``frame_problem`` did not foresee) is dead-lettered and acked
    instead of raising into the consumer. Set it as a task's ``Strategy``."""
    from celery.worker.strategy import default

    handler = default(task, app, consumer, **kwargs)
    connection_errors = tuple(consumer.connection_errors)

    def on_message(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **more: Any) -> Any:
        try:
            return handler(message, body, ack, reject, callbacks, **more)
        except connection_errors:
            raise  # the consumer reconnects; the message is still unacked, so it comes back
        except Exception as exc:
            queue = str((message.delivery_info or {}).get("routing_key") or "")
            try:
                raw = _dump(message.serializable())
            except Exception:  # the frame is too broken to re-encode: keep what can be shown
                raw = _dump({"headers": message.headers, "body": repr(message.body)[:4096]})
            _GUARD.move_aside(raw, f"Celery could not take the message: {type(exc).__name__}: {exc}", queue)
            message.ack()
            return None

    return on_message
