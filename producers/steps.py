"""The Redis reads and waits the clients' shared logic yields (``producers.replies``), the
runners that perform them (blocking for ``Client``, awaited for ``AsyncClient``), and the
steps that read a result stored in parts (``producers.protocol.parts``) back whole."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from hetbatch.producers.protocol import parts
from hetbatch.producers.protocol.keys import Keys

__all__ = ["Blpop", "Exists", "Lpop", "Mget", "Step", "Steps", "Wait", "arun", "join_steps", "run"]

T = TypeVar("T")


@dataclass(frozen=True)
class Mget:
    keys: list[str]


@dataclass(frozen=True)
class Exists:
    key: str


@dataclass(frozen=True)
class Blpop:
    key: str
    timeout_s: int


@dataclass(frozen=True)
class Lpop:
    key: str
    count: int


@dataclass(frozen=True)
class Wait:
    """Sleep ``seconds``, or less when a notice for ``unit`` arrives (``None``: just sleep)."""

    unit: str | None
    seconds: float


Step = Mget | Exists | Blpop | Lpop | Wait
Steps = Generator[Step, Any, T]


def join_steps(keys: Keys, job_id: str, unit: str, payloads: dict[int, bytes]) -> Steps[None]:
    """Replace each manifest in ``payloads`` (chunk -> stored result of ``unit``, the job's
    id or its pack's) by the result its parts make (``producers.protocol.parts``), reading
    them in order; errors name ``job_id``.

    Raises:
        JobLost: a part is gone.
        JobFailed: a manifest or part does not hold what it should (remote type PayloadError).
    """
    for chunk in sorted(c for c, v in payloads.items() if parts.is_manifest(v)):
        sizes = parts.read_manifest(job_id, chunk, payloads[chunk])
        names = parts.part_keys(keys, unit, chunk, len(sizes))
        got: list[bytes | None] = []
        for group in parts.groups(sizes):
            got += cast(list[bytes | None], (yield Mget(names[group.start : group.stop])))
            read = zip(got[group.start :], sizes[group.start : group.stop], strict=True)
            if any(p is None or len(p) != n for p, n in read):
                # Fail at the first bad part, not after a round trip for each of 65,536 listed parts.
                got += [None] * (len(sizes) - len(got))
                break
        payloads[chunk] = parts.join(job_id, chunk, sizes, got)


def run(steps: Steps[T], do: Callable[[Step], Any]) -> T:
    """Run ``steps`` with a blocking ``do``; an error of ``do`` goes back into ``steps``."""
    reply: Any = None
    error: Exception | None = None
    while True:
        try:
            step = steps.throw(error) if error is not None else steps.send(reply)
        except StopIteration as stop:
            return cast(T, stop.value)
        reply, error = None, None
        try:
            reply = do(step)
        except Exception as exc:
            error = exc


async def arun(steps: Steps[T], do: Callable[[Step], Awaitable[Any]]) -> T:
    """``run`` for asyncio: ``do`` is awaited."""
    reply: Any = None
    error: Exception | None = None
    while True:
        try:
            step = steps.throw(error) if error is not None else steps.send(reply)
        except StopIteration as stop:
            return cast(T, stop.value)
        reply, error = None, None
        try:
            reply = await do(step)
        except Exception as exc:
            error = exc
