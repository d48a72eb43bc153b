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

import argparse
import logging
import os
import sys

from hetbatch.producers.errors import ConfigError
from hetbatch.worker.settings import WorkerSettings

__all__ = ["add_parser", "basic_auth", "cmd_flower"]

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


def cmd_flower(args: argparse.Namespace) -> int:
    """Run Flower until interrupted.

    Raises:
        ConfigError: no credentials and no ``--no-auth``.
    """
    from hetbatch.worker.app import make_app

    settings = WorkerSettings.from_env(redis_url=args.redis_url, flower_port=args.port)
    if args.no_auth:
        message = "Flower runs WITHOUT authentication (--no-auth): anyone who reaches the port sees every task"
        log.warning(message)
        print(f"hetbatch: warning: {message}", file=sys.stderr)
        os.environ.pop("FLOWER_BASIC_AUTH", None)
    else:
        os.environ["FLOWER_BASIC_AUTH"] = basic_auth(settings)
    app = make_app(settings)
    argv = ["flower", f"--port={settings.flower_port}", f"--address={args.address}", f"--max_tasks={args.max_tasks}"]
    if args.url_prefix:
        argv.append(f"--url_prefix={args.url_prefix}")
    app.start(argv)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``hetbatch flower`` to the CLI."""
    p = sub.add_parser("flower", help="start Flower (basic auth from HETBATCH_FLOWER_USER/_PASSWORD)")
    p.add_argument("--port", type=int, default=None, help="listen port (default: $HETBATCH_FLOWER_PORT or 5555)")
    p.add_argument("--address", default="0.0.0.0", help="listen address")
    p.add_argument("--max-tasks", type=int, default=10_000, help="tasks Flower keeps in memory")
    p.add_argument("--url-prefix", default="", help="serve under this path, behind a reverse proxy")
    p.add_argument("--no-auth", action="store_true", help="run without authentication (warns; unsafe)")
    p.set_defaults(func=cmd_flower)
