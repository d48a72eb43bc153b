"""Typed reading of a task envelope's JSON fields: every refusal names the job and the field.

A worker reads envelopes that anyone with access to a queue can write, so each field is
checked for its type and its size before it is used; ``TaskEnvelope.from_dict`` (in
``producers.protocol.wire``) reads every field through ``Fields``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any, NoReturn

from hetbatch.producers.errors import PayloadError
from hetbatch.producers.protocol.keys import is_reply
from hetbatch.producers.protocol.tracing import is_traceparent

__all__ = [
    "MAX_INLINE",
    "MAX_ITEMS",
    "MAX_TEXT",
    "Answer",
    "Fields",
    "answerable_fields",
    "first_job",
    "is_id",
    "read_item",
]

MAX_TEXT = 256  # characters of a name, an id or a key name
MAX_ITEMS = 100_000  # items of one task (a pack of small jobs holds thousands at most)
MAX_ROWS = 2**31 - 1  # Arrow's 32-bit offsets bound a record batch anyway
MAX_INLINE = 128 << 20  # characters of inline base64: far above any inline payload a client writes
MAX_OBJECT = 64 << 10  # bytes of a nested object's JSON (an ensemble continuation)
# Job and pack ids: what clients make (uuid hex, "<pack>-<n>", "<job>~<stage>.<slot>"). They end
# up in key and file names, so nothing that could name another key (":") or folder ("/").
_ID = re.compile(r"[A-Za-z0-9_.@~-]{1,200}")


def is_id(value: object) -> bool:
    """Whether ``value`` can be a job or pack id."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


class Fields:
    """Reads the fields of one decoded JSON object.

    Args:
        data: the object.
        job: the job the object speaks for, for error messages ("" while not known yet).
    """

    def __init__(self, data: Mapping[str, Any], job: str = "") -> None:
        self.data = data
        self.job = job

    def fail(self, name: str, problem: str) -> NoReturn:
        """Raises:
        PayloadError: naming the job (when known) and the field."""
        who = f"job {self.job}" if self.job else "a task"
        raise PayloadError(f"malformed task envelope of {who}: field {name!r} {problem}")

    def _get(self, name: str, required: bool) -> Any:
        if name not in self.data and required:
            self.fail(name, "is missing")
        return self.data.get(name)

    def text(self, name: str, *, max_len: int = MAX_TEXT, empty: bool = False) -> str:
        """A string of at most ``max_len`` characters (non-empty unless ``empty``)."""
        value = self._get(name, True)
        if not isinstance(value, str) or not (value or empty):
            self.fail(name, f"must be a non-empty string, not {_shown(value)}")
        if len(value) > max_len:
            self.fail(name, f"is {len(value)} characters long, over the limit of {max_len}")
        return value

    def opt_text(self, name: str, *, max_len: int = MAX_TEXT, empty: bool = False) -> str | None:
        """``text``, or None when the field is absent or null."""
        return None if self.data.get(name) is None else self.text(name, max_len=max_len, empty=empty)

    def ident(self, name: str, value: Any = None) -> str:
        """A job or pack id (``is_id``): field ``name``, or ``value`` (an element of it) when given."""
        value = self.text(name) if value is None else value
        if not is_id(value):
            self.fail(name, f"is not a job id (1-200 letters, digits and _.@~-): {_shown(value)}")
        return str(value)

    def count(self, name: str, value: Any, limit: int = MAX_ROWS) -> int:
        """``value`` (an element of field ``name``) as an integer from 0 to ``limit``."""
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
            self.fail(name, f"must hold integers from 0 to {limit}, not {_shown(value)}")
        return value

    def seq(self, name: str, *, limit: int = MAX_ITEMS) -> list[Any]:
        """A non-empty JSON list of at most ``limit`` elements."""
        value = self._get(name, True)
        if not isinstance(value, list) or not value:
            self.fail(name, f"must be a non-empty list, not {_shown(value)}")
        if len(value) > limit:
            self.fail(name, f"lists {len(value)} entries, over the limit of {limit}")
        return value

    def number(self, name: str) -> float | None:
        """An optional finite number."""
        value = self._get(name, False)
        if value is None:
            return None
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            self.fail(name, f"must be a finite number, not {_shown(value)}")
        return float(value)

    def trace(self, name: str) -> str | None:
        """An optional W3C ``traceparent`` (``producers.protocol.tracing.is_traceparent``)."""
        value = self._get(name, False)
        if value is not None and not is_traceparent(value):
            self.fail(name, f"must be a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>), not {_shown(value)}")
        return None if value is None else str(value)

    def obj(self, name: str) -> dict[str, Any] | None:
        """An optional JSON object of at most ``MAX_OBJECT`` bytes."""
        value = self._get(name, False)
        if value is None:
            return None
        if not isinstance(value, dict):
            self.fail(name, f"must be an object, not {_shown(value)}")
        try:
            size = len(json.dumps(value))
        except (ValueError, TypeError, RecursionError):
            self.fail(name, "is not plain JSON")
        if size > MAX_OBJECT:
            self.fail(name, f"is {size} bytes of JSON, over the limit of {MAX_OBJECT}")
        return value


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def read_item(f: Fields, entry: Any) -> tuple[str, int, int]:
    """An element of field ``items``: ``(job_id, chunk, rows)``."""
    if not isinstance(entry, list) or len(entry) != 3:
        f.fail("items", f"must hold [job_id, chunk, rows] lists, not {_shown(entry)}")
    return f.ident("items", entry[0]), f.count("items", entry[1]), f.count("items", entry[2])


def first_job(data: Mapping[str, Any]) -> str:
    """The id of the job a body speaks for, when one can be read (for error messages)."""
    items, pack = data.get("items"), data.get("pack")
    if isinstance(items, list) and items and isinstance(items[0], list) and items[0] and is_id(items[0][0]):
        return str(items[0][0])
    return str(pack) if is_id(pack) else ""


Answer = tuple[list[tuple[str, int, int]], str | None, str | None]


def answerable_fields(data: Any) -> Answer | None:
    """The ``(items, reply_to, pack)`` of a body that can be answered with an error result
    though it was refused, each only when it passes its own check; None when no job can
    be named. A pack's producer waits on the pack's one result: items that are
    ``<pack>-<n>`` at chunk 0 of a body with a ``pack`` field are answered as that pack."""
    if not isinstance(data, dict):
        return None
    f = Fields(data)
    reply = data.get("reply_to")
    reply_to = reply if isinstance(reply, str) and len(reply) <= MAX_TEXT and is_reply(reply) else None
    try:
        if "sizes" in data or "items" not in data:
            pack = f.ident("pack")
            sizes = data.get("sizes")
            count = len(sizes) if isinstance(sizes, list) and 0 < len(sizes) <= MAX_ITEMS else 1
            return [(f"{pack}-{n}", 0, 0) for n in range(count)], reply_to, pack
        items = [read_item(f, entry) for entry in f.seq("items")]
    except PayloadError:
        return None
    head = items[0][0].rpartition("-")[0]
    as_pack = "pack" in data and is_id(head) and all(i[:2] == (f"{head}-{n}", 0) for n, i in enumerate(items))
    return items, reply_to, head if as_pack else None
