"""Redis Sentinel URLs: one string names the sentinels, the master group and the credentials.

Form (kombu's own broker URL for its Sentinel transport, sentinels separated by ``;``,
plus the master group's name as a query parameter)::

    sentinel://[[user]:password@]host:port[/db];sentinel://host:port[;...]?master_name=NAME

``user``/``password`` (of the first sentinel entry) log in to the *master*; sentinels
that require a password of their own take ``sentinel_password=...`` in the query. The
same string works as ``HETBATCH_REDIS_URL`` for producers, workers and every operator
command: ``client`` turns it into a redis-py client bound to the current master
(``Sentinel.master_for``; ``async_client``: the ``redis.asyncio`` one, for ``AsyncClient``),
``broker`` into kombu's URL and ``master_name`` transport option. All re-ask the
sentinels for the master whenever a connection is made, so after a failover the next
reconnect reaches the new master without a restart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelConnectionPool as AsyncSentinelPool
from redis.sentinel import Sentinel

from hetbatch.producers.errors import ConfigError

__all__ = ["SCHEME", "SentinelUrl", "async_client", "broker", "client", "is_sentinel"]

SCHEME = "sentinel"
_QUERY_KEYS = {"master_name", "sentinel_password"}
# Sentinels answer one small query per new connection; a dead one must not stall it for long.
_SENTINEL_TIMEOUT_S = 1.0


def is_sentinel(url: str) -> bool:
    """Whether ``url`` is in the Sentinel form of this module."""
    return url.startswith(f"{SCHEME}://")


@dataclass(frozen=True)
class SentinelUrl:
    """A parsed Sentinel URL."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None

    @classmethod
    def parse(cls, url: str) -> SentinelUrl:
        """Read ``url`` (see the module docstring).

        Raises:
            ConfigError: not a sentinel URL, no ``master_name``, a part without host and
                port, an unknown query parameter or a database that is not a number.
        """
        base, _, query = url.partition("?")
        params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        unknown = set(params) - _QUERY_KEYS
        if unknown:
            raise ConfigError(f"unknown sentinel URL parameter(s) {sorted(unknown)}: use {sorted(_QUERY_KEYS)}")
        if not params.get("master_name"):
            raise ConfigError("a sentinel:// URL needs ?master_name=<the group the sentinels monitor>")
        sentinels, db, user, password = [], 0, None, None
        for i, part in enumerate(p for p in base.split(";") if p.strip()):
            try:  # urlsplit and .port raise ValueError on a bad IPv6 host or port
                parsed = urlsplit(part.strip())
                host, port = parsed.hostname, parsed.port
            except ValueError as exc:
                raise ConfigError(f"sentinel URL part {i + 1} is not sentinel://host:port ({exc})") from None
            if parsed.scheme != SCHEME or not host or not port:
                raise ConfigError(f"sentinel URL part {i + 1} is not sentinel://host:port")
            sentinels.append((host, port))
            if i == 0:
                user = unquote(parsed.username) if parsed.username else None
                password = unquote(parsed.password) if parsed.password else None
                path = parsed.path.strip("/")
                if path and not path.isdigit():
                    raise ConfigError(f"sentinel URL database {path!r} is not a number")
                db = int(path or 0)
        if not sentinels:
            raise ConfigError("a sentinel:// URL names no sentinel")
        return cls(tuple(sentinels), params["master_name"], db, user, password, params.get("sentinel_password"))

    def kombu_url(self) -> str:
        """kombu's broker URL: every sentinel, the master's credentials and database on each."""
        auth = ""
        if self.password is not None:
            auth = f"{self.username or ''}:{self.password}@"
        return ";".join(f"{SCHEME}://{auth}{host}:{port}/{self.db}" for host, port in self.sentinels)

    def sentinel_kwargs(self) -> dict[str, Any]:
        """Connection options of the sentinels themselves (not of the master)."""
        out: dict[str, Any] = {"socket_timeout": _SENTINEL_TIMEOUT_S, "socket_connect_timeout": _SENTINEL_TIMEOUT_S}
        if self.sentinel_password is not None:
            out["password"] = self.sentinel_password
        return out


def client(url: str, **kwargs: Any) -> redis.Redis:
    """A redis-py client for the current master of ``url``'s group (``kwargs``: connection
    options, as for ``redis.Redis``). Each new connection asks the sentinels where the
    master is; a connection to a master that became a replica is dropped.

    Raises:
        ConfigError: ``url`` is not a valid sentinel URL.
    """
    parsed = SentinelUrl.parse(url)
    manager = Sentinel(list(parsed.sentinels), sentinel_kwargs=parsed.sentinel_kwargs())  # type: ignore[no-untyped-call]
    master = manager.master_for(  # type: ignore[no-untyped-call]
        parsed.master_name, db=parsed.db, username=parsed.username, password=parsed.password, **kwargs
    )
    return cast(redis.Redis, master)


class _BlockingSentinelPool(AsyncSentinelPool, aioredis.BlockingConnectionPool):
    """A pool of connections to the current master that waits for a free connection when
    all are busy (as ``AsyncClient``'s plain pool), and closes its sentinel connections
    with its own (each ``async_client`` has a sentinel manager of its own)."""

    async def disconnect(self, inhibit_read: bool = True) -> None:
        await super().disconnect(inhibit_read)
        for sentinel in self.sentinel_manager.sentinels:
            await sentinel.aclose()


def async_client(url: str, *, max_connections: int, timeout_s: float, **kwargs: Any) -> aioredis.Redis:
    """``client`` for asyncio: a ``redis.asyncio`` client of the current master of ``url``'s
    group, with at most ``max_connections`` connections; a call waits up to ``timeout_s``
    for a free one. After a failover its next connection reaches the new master.

    Raises:
        ConfigError: ``url`` is not a valid sentinel URL.
    """
    parsed = SentinelUrl.parse(url)
    manager = AsyncSentinel(list(parsed.sentinels), sentinel_kwargs=parsed.sentinel_kwargs())  # type: ignore[no-untyped-call]
    master = manager.master_for(
        parsed.master_name,
        connection_pool_class=_BlockingSentinelPool,
        db=parsed.db,
        username=parsed.username,
        password=parsed.password,
        max_connections=max_connections,
        timeout=timeout_s,
        **kwargs,
    )
    return cast(aioredis.Redis, master)


def broker(url: str) -> tuple[str, dict[str, Any]]:
    """kombu's broker URL for ``url`` and the transport options it needs on top of
    hetbatch's own (none for a plain ``redis://`` or ``rediss://`` URL).

    Raises:
        ConfigError: ``url`` is a sentinel URL but not a valid one.
    """
    if not is_sentinel(url):
        return url, {}
    parsed = SentinelUrl.parse(url)
    return parsed.kombu_url(), {"master_name": parsed.master_name, "sentinel_kwargs": parsed.sentinel_kwargs()}
