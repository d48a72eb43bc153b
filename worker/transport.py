"""One fix to kombu's Redis transport in worker processes.

kombu builds a new redis-py client object for every delivered message and every ack
(``Channel.conn_or_acquire``); redis-py 8's constructor sets up a table of some two
hundred response callbacks, and a profile of a worker under many small tasks found 15%
of its samples there. A redis-py client holds no connection of its own
and is thread-safe, so one per connection pool is reused.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis

__all__ = ["reuse_redis_clients"]

_original = kombu_redis.Channel._create_client


def _create_client(self: Any, asynchronous: bool = False) -> Any:
    if asynchronous:
        return _original(self, asynchronous)
    client = self.__dict__.get("_hetbatch_client")
    if client is None or client.connection_pool is not self.pool:  # a new pool after a reconnect
        client = self._hetbatch_client = _original(self, False)
    return client


def reuse_redis_clients() -> None:
    """Patch ``kombu.transport.redis.Channel`` in this process (idempotent)."""
    kombu_redis.Channel._create_client = _create_client
