"""``hetbatch flower``: Flower on the workers' own Celery app, with basic auth by default.

Flower turns the workers' task events on while it watches; it shows each task's ``argsrepr``, which the
producer sets to ``TaskEnvelope.describe()`` (model, job id, rows), so payload bytes,
inline base64 included, never reach Flower. Credentials come from
``HETBATCH_FLOWER_USER`` / ``HETBATCH_FLOWER_PASSWORD`` and are handed to Flower
through its environment, not its command line, where ``ps`` would show them.
``/healthcheck`` answers without credentials (for container healthchecks); every
page and the HTTP API need them.
"""

from __future__ import annotations

import logging
import os
import sys

from hetbatch.producers.errors import ConfigError
from hetbatch.worker.settings import WorkerSettings

__all__ = ["basic_auth", "run_flower"]

log = logging.getLogger(__name__)


def basic_auth(settings: WorkerSettings) -> str:
    """Flower's ``user:password`` credential.

    Raises:
        ConfigError: user or password missing, or holding characters Flower splits on.
    """
    user, password = settings.flower_user, settings.flower_password
    if not user or not password:
        raise ConfigError(
            "Flower needs credentials: set HETBATCH_FLOWER_USER and HETBATCH_FLOWER_PASSWORD "
            "(or pass --no-auth to run it open, which is unsafe outside a closed network)"
        )
    if ":" in user or "," in user or "," in password:
        raise ConfigError("the Flower user may not contain ':' or ',' and the password may not contain ','")
    return f"{user}:{password}"


def run_flower(
    settings: WorkerSettings,
    *,
    address: str = "0.0.0.0",
    max_tasks: int = 10_000,
    url_prefix: str = "",
    no_auth: bool = False,
) -> None:
    """Run Flower on ``settings.flower_port`` until interrupted.

    Args:
        settings: the workers' settings (broker, Flower credentials and port).
        address: the interface to listen on.
        max_tasks: tasks Flower keeps in memory.
        url_prefix: serve under this path (behind a reverse proxy).
        no_auth: run without authentication (warns; unsafe outside a closed network).

    Raises:
        ConfigError: no credentials and not ``no_auth``.
    """
    from hetbatch.worker.app import make_app

    if no_auth:
        message = "Flower runs WITHOUT authentication (--no-auth): anyone who reaches the port sees every task"
        log.warning(message)
        print(f"hetbatch: warning: {message}", file=sys.stderr)
        os.environ.pop("FLOWER_BASIC_AUTH", None)
    else:
        os.environ["FLOWER_BASIC_AUTH"] = basic_auth(settings)
    app = make_app(settings)
    argv = ["flower", f"--port={settings.flower_port}", f"--address={address}", f"--max_tasks={max_tasks}"]
    if url_prefix:
        argv.append(f"--url_prefix={url_prefix}")
    app.start(argv)
