"""Idempotent result writes: the first result stored for a job chunk wins, and only
that write announces itself on the producer's reply list."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import redis

from producers.wire import Keys, Notice, encode_notice

__all__ = ["Outcome", "ResultWriter"]

# KEYS[1]: reply list ('' for none). ARGV[1]: ttl in ms, then (key, value, notice) triples.
_STORE = """
local stored = {}
for i = 2, #ARGV, 3 do
  if redis.call('SET', ARGV[i], ARGV[i + 1], 'NX', 'PX', ARGV[1]) then
    stored[#stored + 1] = ARGV[i + 2]
  end
end
if KEYS[1] ~= '' and #stored > 0 then
  for j = 1, #stored, 1000 do
    redis.call('RPUSH', KEYS[1], unpack(stored, j, math.min(j + 999, #stored)))
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return #stored
"""


@dataclass(frozen=True)
class Outcome:
    """The encoded result of one job chunk."""

    job_id: str
    chunk: int
    result: bytes


class ResultWriter:
    def __init__(self, client: redis.Redis, keys: Keys, *, ttl_s: int, inline_bytes: int) -> None:
        self._script = client.register_script(_STORE)
        self._keys = keys
        self._ttl_ms = ttl_s * 1000
        self._inline = inline_bytes

    def write(self, outcomes: Sequence[Outcome], reply_to: str | None) -> int:
        """Store each outcome unless one is stored already; returns how many were new."""
        args: list[bytes | str | int] = [self._ttl_ms]
        for out in outcomes:
            inline = out.result if len(out.result) <= self._inline else None
            args += [
                self._keys.result(out.job_id, out.chunk),
                out.result,
                encode_notice(Notice(out.job_id, out.chunk, inline)),
            ]
        return int(self._script(keys=[reply_to or ""], args=args))

    def existing(self, client: redis.Redis, items: Sequence[tuple[str, int]]) -> list[bool]:
        """Which job chunks already have a stored result (redelivered or duplicate tasks)."""
        pipe = client.pipeline(transaction=False)
        for job_id, chunk in items:
            pipe.exists(self._keys.result(job_id, chunk))
        return [bool(v) for v in pipe.execute()]
