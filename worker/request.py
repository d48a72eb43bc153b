"""What Celery's remote control shows of a hetbatch task: a summary, never its payload.

``celery inspect active`` (and ``reserved``, ``scheduled``, ``query_task``) answers with
``Request.info()``, which holds the task's decoded arguments unless the client asked
for ``safe`` replies, and the ``celery`` command line never does. A hetbatch envelope
may carry its input inline (``payload_b64``), so the worker answers with a summary of
the envelope (model, job id, rows) whatever the client asked. Flower and ``celery
events`` show the ``argsrepr`` the producer wrote, which is the same summary.
"""

from __future__ import annotations

from typing import Any

from celery.worker.request import Request

from hetbatch.producers.errors import PayloadError
from hetbatch.producers.protocol.ensemble import Continuation
from hetbatch.producers.protocol.wire import FUSE_TASK_NAME, TASK_NAME, TaskEnvelope

__all__ = ["RedactedRequest", "summarize"]

HIDDEN = "<hidden: not a hetbatch envelope>"


def summarize(task: str, args: Any) -> str:
    """A one-line summary of a task's arguments that holds no payload bytes.

    Args:
        task: the Celery task name.
        args: the task's positional arguments as decoded from the message.

    Returns:
        ``model@version jobs=N first=<job id> rows=R`` for a predict task, the
        ensemble, job id, chunk, stage and rows for a fusion step, else ``HIDDEN``
        (arguments that are not a hetbatch envelope are not shown at all).
    """
    if not isinstance(args, list | tuple) or len(args) != 1:
        return HIDDEN
    try:
        if task == TASK_NAME:
            return TaskEnvelope.from_dict(args[0]).describe()
        if task == FUSE_TASK_NAME:
            c = Continuation.from_dict(args[0])
            return f"{c.ensemble} job={c.job_id} chunk={c.chunk} stage={c.stage} rows={c.rows}"
    except PayloadError:
        pass
    return HIDDEN


class RedactedRequest(Request):  # type: ignore[misc]  # celery ships no type hints
    """Celery's task request with ``info()`` that never holds the arguments themselves.

    Set as the ``Request`` of hetbatch's tasks; only remote-control replies call
    ``info()``, so the task's own path is unchanged.
    """

    def info(self, safe: bool = False) -> dict[str, Any]:
        """Celery's request info with ``args`` replaced by :func:`summarize`'s line.

        Args:
            safe: ignored: every reply is safe.
        """
        out: dict[str, Any] = super().info(safe=True)
        out["args"] = summarize(self.name, self._args)
        out["kwargs"] = {}
        return out
