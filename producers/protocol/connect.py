"""Redis connections for the data path: hiredis parses replies (when installed), while
commands are packed by redis-py's Python packer, which hands large values to the socket
without copying them (hiredis's packer copies every byte: slow for megabyte payloads)."""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
from redis._parsers.encoders import Encoder
from redis.connection import PythonRespSerializer

from hetbatch.producers.protocol.sentinel import async_client as async_sentinel_client
from hetbatch.producers.protocol.sentinel import client as sentinel_client
from hetbatch.producers.protocol.sentinel import is_sentinel

__all__ = ["async_connect", "connect"]

# Values above this size are written to the socket as they are, not joined into a buffer.
_BUFFER_CUTOFF = 6000
_PACKER = PythonRespSerializer(_BUFFER_CUTOFF, Encoder("utf-8", "strict", False).encode)  # type: ignore[no-untyped-call]


def connect(url: str, **kwargs: Any) -> redis.Redis:
    """A client for ``url`` whose connections pack commands without copying large values.
    A ``sentinel://`` URL (``producers.protocol.sentinel``) gives a client of its group's
    current master, which follows a failover on its next connection."""
    if is_sentinel(url):
        return sentinel_client(url, command_packer=_PACKER, **kwargs)
    return redis.Redis.from_url(url, command_packer=_PACKER, **kwargs)


def async_connect(url: str, *, max_connections: int, timeout_s: float) -> aioredis.Redis:
    """A ``redis.asyncio`` client for ``url`` (``redis://``, ``rediss://`` or ``sentinel://``)
    with at most ``max_connections`` connections: a call waits up to ``timeout_s`` for a
    free one instead of failing with ``MaxConnectionsError``."""
    if is_sentinel(url):
        return async_sentinel_client(url, max_connections=max_connections, timeout_s=timeout_s)
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=timeout_s)
    return aioredis.Redis(connection_pool=pool)
