"""Operator commands: ``hetbatch status``, ``backlog``, ``dlq``, ``reconcile`` and ``flower``."""

from __future__ import annotations

import argparse
import json
import time

__all__ = ["add_parsers"]


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``status``, ``backlog``, ``dlq``, ``reconcile`` and ``flower``."""
    p = sub.add_parser("status", help="queues, depths, workers, their pools and loaded models")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--ping-timeout-s", type=float, default=1.0, help="wait for worker pings (0: heartbeats only)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("backlog", help="jobs per queue not finished: waiting, reserved and held (autoscaling signal)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--queue", action="append", default=None, help="only this queue (repeatable)")
    p.add_argument("--serve-port", type=int, default=None, help="serve it as Prometheus metrics on this port")
    p.add_argument("--address", default="0.0.0.0", help="listen address with --serve-port")
    p.set_defaults(func=cmd_backlog)

    p = sub.add_parser("dlq", help="list, retry or purge dead-lettered (poison) jobs")
    p.add_argument("action", choices=["list", "retry", "purge"])
    p.add_argument("task_ids", nargs="*", help="task ids (default: every dead-lettered task)")
    p.set_defaults(func=cmd_dlq)

    p = sub.add_parser("reconcile", help="re-publish lost jobs and dead-letter poison jobs (leader-elected)")
    p.add_argument("--once", action="store_true", help="one sweep (twice to act on a lost task), then exit")
    p.add_argument("--interval-s", type=float, default=10.0, help="seconds between sweeps")
    p.add_argument("--overdue-s", type=float, default=None, help="task age before it is checked")
    p.set_defaults(func=cmd_reconcile)

    p = sub.add_parser("flower", help="start Flower (basic auth from HETBATCH_FLOWER_USER/_PASSWORD)")
    p.add_argument("--port", type=int, default=None, help="listen port (default: $HETBATCH_FLOWER_PORT or 5555)")
    p.add_argument("--address", default="0.0.0.0", help="listen address")
    p.add_argument("--max-tasks", type=int, default=10_000, help="tasks Flower keeps in memory")
    p.add_argument("--url-prefix", default="", help="serve under this path, behind a reverse proxy")
    p.add_argument("--no-auth", action="store_true", help="run without authentication (warns; unsafe)")
    p.set_defaults(func=cmd_flower)


def cmd_status(args: argparse.Namespace) -> int:
    from hetbatch.producers.protocol.keys import Keys
    from hetbatch.worker.ops.status import render, report
    from hetbatch.worker.settings import WorkerSettings

    settings = WorkerSettings.from_env(redis_url=args.redis_url)
    found = report(settings.redis_url, Keys(settings.prefix), ping_timeout_s=args.ping_timeout_s)
    print(json.dumps(found.to_dict(), indent=2) if args.json else render(found))
    return 0


def cmd_backlog(args: argparse.Namespace) -> int:
    from hetbatch.producers.protocol.connect import connect
    from hetbatch.producers.protocol.keys import Keys
    from hetbatch.worker.ops.backlog import known_queues, measure, render, serve, to_dict
    from hetbatch.worker.settings import WorkerSettings

    settings = WorkerSettings.from_env(redis_url=args.redis_url)
    keys = Keys(settings.prefix)
    client = connect(settings.redis_url)
    if args.serve_port is not None:
        client.ping()  # a wrong URL or password fails now, not at the first scrape
        serve(client, keys, port=args.serve_port, address=args.address, queues=args.queue or ())
    try:
        found = measure(client, keys, args.queue or known_queues(client, keys))
    finally:
        client.close()
    if args.queue:
        found = {q: b for q, b in found.items() if q in args.queue}
    print(json.dumps(to_dict(found), indent=2) if args.json else render(found))
    return 0


def cmd_dlq(args: argparse.Namespace) -> int:
    from hetbatch.producers.protocol.connect import connect
    from hetbatch.producers.protocol.keys import Keys
    from hetbatch.producers.settings import ClientSettings
    from hetbatch.worker.ops.dlq import DeadLetters
    from hetbatch.worker.ops.reconciler import Republisher

    settings = ClientSettings.from_env(redis_url=args.redis_url)
    client = connect(settings.redis_url)
    dlq = DeadLetters(client, Keys(settings.prefix), result_ttl_s=settings.result_ttl_s)
    try:
        if args.action == "list":
            entries = dlq.entries()
            if not entries:
                print("the dead-letter list is empty")
            for e in entries:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.dead))
                # A raw entry's task id names no job: show the ids it was found to name.
                more = ",..." if len(e.jobs) > 3 else ""
                named = f" ({','.join(e.jobs[:3])}{more})" if e.model == "-" and e.jobs else ""
                print(f"{e.task_id}  {e.model}  jobs={len(e.jobs)}{named}  attempts={e.attempts}  {when}  {e.reason}")
        elif args.action == "retry":
            ids = args.task_ids or [e.task_id for e in dlq.entries()]
            with Republisher(settings.redis_url) as pub:
                done = dlq.retry(ids, pub.publish)
            print(f"retried {len(done)} task(s)")
        else:
            print(f"purged {dlq.purge(args.task_ids or None)} task(s)")
    finally:
        client.close()
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    from hetbatch.producers.protocol.keys import Keys
    from hetbatch.worker.ops.reconciler import SweepReport, run
    from hetbatch.worker.settings import WorkerSettings

    settings = WorkerSettings.from_env(redis_url=args.redis_url)

    def show(report: SweepReport) -> None:
        print(
            f"checked={report.checked} done={report.done} queued={report.queued} suspect={report.suspect} "
            f"republished={len(report.republished)} dead_lettered={len(report.dead_lettered)}",
            flush=True,
        )

    run(
        settings.redis_url,
        Keys(settings.prefix),
        once=args.once,
        interval_s=args.interval_s,
        overdue_s=args.overdue_s if args.overdue_s is not None else settings.overdue_s,
        max_attempts=settings.max_attempts,
        result_ttl_s=settings.result_ttl_s,
        on_sweep=show,
    )
    return 0


def cmd_flower(args: argparse.Namespace) -> int:
    from hetbatch.worker.ops.flower import run_flower
    from hetbatch.worker.settings import WorkerSettings

    settings = WorkerSettings.from_env(redis_url=args.redis_url, flower_port=args.port)
    run_flower(settings, address=args.address, max_tasks=args.max_tasks, url_prefix=args.url_prefix,
               no_auth=args.no_auth)  # fmt: skip
    return 0
