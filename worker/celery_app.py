"""The Celery app target for Celery's own tools: ``celery -A hetbatch.worker.celery_app``.

``celery -A hetbatch.worker.celery_app inspect ping|active|active_queues|stats|registered``,
``celery -A hetbatch.worker.celery_app control ...`` and ``celery -A
hetbatch.worker.celery_app events`` work against hetbatch workers as against any Celery
app (docs/celery.md). The broker is ``HETBATCH_REDIS_URL`` (or ``celery -b URL``, which
wins), and the app carries the workers' JSON-only wire settings and kombu transport
options, so its replies and events land in the lists the workers write to.

It is a client: ``celery -A hetbatch.worker.celery_app worker`` refuses to start,
because a hetbatch worker is more than a Celery consumer (``hetbatch worker``).
"""

from __future__ import annotations

from typing import Any, NoReturn

from celery import Celery

from hetbatch.producers.client import make_producer_app
from hetbatch.producers.errors import ConfigError
from hetbatch.worker.settings import WorkerSettings

__all__ = ["app", "make_control_app"]


def _no_worker(*_: Any, **__: Any) -> NoReturn:
    raise ConfigError(
        "hetbatch.worker.celery_app is for celery inspect, control and events only: "
        "start workers with `hetbatch worker`"
    )


def make_control_app(redis_url: str) -> Celery:
    """A Celery app that inspects, controls and watches hetbatch workers at ``redis_url``.

    Args:
        redis_url: the workers' broker; ``celery -b URL`` (``CELERY_BROKER_URL``) overrides it.

    Returns:
        The producers' app (same serializers and transport options as the workers') with
        its ``Worker`` replaced by one that raises ``ConfigError``.
    """
    control = make_producer_app(redis_url)
    # Without a bound a wrong URL makes every command retry the connection forever.
    control.conf.broker_connection_timeout = 2.0
    control.conf.broker_connection_max_retries = 3
    control.__dict__["Worker"] = _no_worker  # shadows Celery's cached property on this app only
    return control


app = make_control_app(WorkerSettings.from_env().redis_url)
