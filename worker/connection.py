"""What went wrong with Redis, in one line, and a worker's check before it starts.

A worker (and ``hetbatch status``, ``dlq``, ``reconcile``) that meets a wrong password,
an ACL user without a command, or no Redis at all says so in one line that names the
URL (password hidden) and what to do, instead of a traceback. A worker checks its
credentials before Celery starts: Celery would retry a refused login forever, logging
a traceback each time.
"""

from __future__ import annotations

import logging
import time

import redis

from hetbatch.producers.errors import BrokerError
from hetbatch.producers.protocol.connect import connect

__all__ = ["broker_error", "check_redis", "redacted"]

log = logging.getLogger(__name__)


def redacted(url: str) -> str:
    """``url`` with every password replaced by ``***``: the one in each ``;``-separated part
    (a ``sentinel://`` URL, ``producers.protocol.sentinel``) and ``password`` or
    ``sentinel_password`` in the query. Plain string work: a URL too broken to parse (it is
    being reported as wrong) is hidden all the same, never raised on."""
    base, sep, query = url.partition("?")
    hidden = ";".join(_hide_login(part) for part in base.split(";"))
    if query:
        query = "&".join(_hide_param(pair) for pair in query.split("&"))
    return hidden + sep + query


_SECRET_PARAMS = frozenset({"password", "sentinel_password"})


def _hide_login(part: str) -> str:
    scheme, sep, rest = part.partition("://")
    login, at, where = rest.rpartition("@")  # the last @: a password may hold an unescaped / or @
    user, colon, _ = login.partition(":")
    if not (sep and at and colon):  # no password in it
        return part
    return f"{scheme}://{user}:***@{where}"


def _hide_param(pair: str) -> str:
    name, eq, _ = pair.partition("=")
    return f"{name}=***" if eq and name in _SECRET_PARAMS else pair


def broker_error(exc: redis.RedisError, url: str) -> BrokerError:
    """``exc`` as a one-line ``BrokerError`` that says what to check."""
    where = redacted(url)
    if isinstance(exc, redis.AuthenticationError):  # before ConnectionError: it is one
        return BrokerError(
            f"Redis at {where} refused the login ({exc}); check the user and password in "
            "--redis-url or HETBATCH_REDIS_URL"
        )
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return BrokerError(
            f"Redis at {where} refused a command to this ACL user ({exc}); grant it the commands SECURITY.md lists"
        )
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return BrokerError(f"cannot reach Redis at {where} ({exc}); is it running, and is the URL right?")
    return BrokerError(f"Redis at {where} failed: {type(exc).__name__}: {exc}")


def check_redis(url: str, *, tries: int = 5, wait: bool = False, interval_s: float = 2.0) -> None:
    """Return once Redis at ``url`` accepts this client's login and a PING.

    A refused login is tried ``tries`` times, ``interval_s`` apart (a password being
    rotated), then raised; with ``wait``, it is tried until it succeeds. An unreachable
    Redis is always waited for (it may start after the worker), with a warning now and then.

    Raises:
        BrokerError: the login was refused ``tries`` times, or a command was refused.
    """
    refused = failed = 0
    while True:
        client = connect(url, socket_connect_timeout=5, socket_timeout=5)
        try:
            client.ping()
            return
        except redis.AuthenticationError as exc:
            refused += 1
            if refused >= tries and not wait:
                raise broker_error(exc, url) from None
            log.warning("%s (try %d%s)", broker_error(exc, url), refused, "" if wait else f" of {tries}")
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            failed += 1
            if failed in (1, 10) or failed % 100 == 0:
                log.warning("%s; waiting for it", broker_error(exc, url))
        except redis.RedisError as exc:
            raise broker_error(exc, url) from None
        finally:
            client.close()
        time.sleep(interval_s)
