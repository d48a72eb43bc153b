"""The Lua scripts hetbatch runs in Redis, read from ``producers/protocol/lua/*.lua``.

Each script is a file of its own (one header comment names its KEYS and ARGV), shipped
as package data; ``script(client, name)`` registers it with a Redis client, which runs
it with EVALSHA (and loads it again after a Redis restart).
"""

from __future__ import annotations

from functools import cache
from importlib import resources

import redis
from redis.commands.core import Script

__all__ = ["script", "source"]


@cache
def source(name: str) -> str:
    """The text of ``lua/<name>.lua``.

    Raises:
        FileNotFoundError: no such script in the installed package.
    """
    return resources.files(__package__ or __name__).joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


def script(client: redis.Redis, name: str) -> Script:
    """``lua/<name>.lua`` registered with ``client`` (call it with ``keys=``, ``args=``,
    and ``client=`` a pipeline to queue it there)."""
    return client.register_script(source(name))
