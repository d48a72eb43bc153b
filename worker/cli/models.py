"""``hetbatch models register|list|show``."""

from __future__ import annotations

import argparse
import json

from hetbatch.worker.cli.common import client_for

__all__ = ["add_parsers"]


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``hetbatch models``."""
    p = sub.add_parser("models", help="register, list and show models")
    p.add_argument("action", choices=["register", "list", "show"])
    p.add_argument("path", nargs="?", help="model directory (register) or name[@version] (show)")
    p.add_argument("--name", default=None, help="register under this name instead of the config's")
    p.add_argument("--version", default=None, help="register as this version (default: next number)")
    p.set_defaults(func=cmd_models, check=_check)


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.action in ("register", "show") and not args.path:
        parser.error(f"models {args.action} needs a PATH or NAME")


def cmd_models(args: argparse.Namespace) -> int:
    client = client_for(args)
    try:
        if args.action == "register":
            from hetbatch.producers.protocol.ensemble import EnsembleSpec
            from hetbatch.worker.modelops.registration import register_path

            spec = register_path(client.registry, args.path, name=args.name, version=args.version)
            if isinstance(spec, EnsembleSpec):
                print(f"registered {spec.ref} ({spec.strategy} of {', '.join(m.ref for m in spec.members)})")
            else:
                print(f"registered {spec.ref} ({spec.framework} on {spec.device}, queue {spec.queue})")
        elif args.action == "list":
            specs = client.registry.list()
            if not specs:
                print("no models registered; add one with 'hetbatch models register DIR'")
            for spec in specs:
                versions = client.registry.versions(spec.name)
                print(
                    f"{spec.name:30} {spec.kind:9} latest={spec.version:5} versions={','.join(versions)} "
                    f"{getattr(spec, 'framework', '-')}.{getattr(spec, 'device', '-')}"
                )
        elif args.action == "show":
            print(json.dumps(client.registry.get(args.path).to_dict(), indent=2, default=str))
    finally:
        client.close()
    return 0
