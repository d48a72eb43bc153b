"""What several commands share."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hetbatch.producers.client import Client

__all__ = ["client_for"]


def client_for(args: argparse.Namespace) -> Client:
    """A client for ``--redis-url`` (or ``HETBATCH_*`` settings)."""
    from hetbatch.producers import Client, ClientSettings

    return Client(ClientSettings.from_env(redis_url=args.redis_url))
