"""Model adaptation commands: ``hetbatch convert``, ``optimize``, ``quantize`` and ``ensembles evaluate``."""

from __future__ import annotations

import argparse
from typing import Any

from hetbatch.adapters.offline.quantize import BATCH_SIZES
from hetbatch.worker.cli.common import client_for
from hetbatch.worker.modelops.evaluation import METRICS

__all__ = ["add_parsers"]


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``convert``, ``optimize``, ``quantize`` and ``ensembles``."""
    helps = {
        "convert": "convert a registered model to ONNX, with a parity report, and register it",
        "optimize": "save ONNX Runtime's optimized graph of an ONNX model and register it",
        "quantize": "quantize an ONNX model (int8 or fp16), with an accuracy report, and register it",
    }
    for command, text in helps.items():
        p = sub.add_parser(command, help=text, description=text)
        p.add_argument("model", help="registered name or name@version")
        p.add_argument("--output", default=None, help="directory for the new model (default: next to the source)")
        p.add_argument("--name", default=None, help="register under this name (default: a new version of MODEL)")
        p.add_argument("--sample", default=None, help="Parquet file of inputs (default: generated from the schema)")
        p.add_argument("--sample-rows", type=int, default=2048, help="rows of the sample file to use")
        p.add_argument("--force", action="store_true", help="register even when the report fails")
        p.set_defaults(func=cmd_adapt)
        if command == "convert":
            p.add_argument("--to", choices=["onnx"], default="onnx")
            p.add_argument("--rtol", type=float, default=None, help="relative tolerance (default 1e-4 for float32)")
            continue
        p.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)), help="rows/s measured at these")
        p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
        if command == "optimize":
            p.add_argument("--level", choices=["basic", "extended", "all"], default="extended")
            continue
        p.add_argument("--mode", choices=["int8", "fp16"], default="int8")
        p.add_argument("--labels", default=None, help="label column of the --sample file: reports accuracy")
        p.add_argument("--max-accuracy-drop", type=float, default=0.01, help="accuracy (fraction) it may lose")
        p.add_argument("--min-agreement", type=float, default=0.98, help="fraction of labels that must agree")
        p.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="where to measure")

    p = sub.add_parser("ensembles", help="evaluate a select ensemble's members and record the best")
    p.add_argument("action", choices=["evaluate"])
    p.add_argument("name", help="ensemble name[@version]")
    p.add_argument("--data", required=True, help="labelled Parquet file with the members' inputs")
    p.add_argument("--label", required=True, help="column holding the true values")
    p.add_argument("--metric", default=None, choices=sorted(METRICS), help="default: accuracy for classifiers")
    p.add_argument("--timeout-s", type=float, default=600.0)
    p.set_defaults(func=cmd_ensembles)


def cmd_adapt(args: argparse.Namespace) -> int:
    from hetbatch.worker.modelops.adapt import Adapted, convert_model, optimize_model, quantize_model

    client = client_for(args)
    common: dict[str, Any] = dict(output=args.output, name=args.name, sample=args.sample,
                                  sample_rows=args.sample_rows, force=args.force)  # fmt: skip
    try:
        done: Adapted
        if args.command == "convert":
            done = convert_model(client.registry, args.model, rtol="auto" if args.rtol is None else args.rtol, **common)
        elif args.command == "optimize":
            sizes = tuple(int(n) for n in args.batch_sizes.split(","))
            done = optimize_model(client.registry, args.model, level=args.level, batch_sizes=sizes,
                                  threads=args.threads, **common)  # fmt: skip
        else:
            sizes = tuple(int(n) for n in args.batch_sizes.split(","))
            done = quantize_model(
                client.registry, args.model, mode=args.mode, labels=args.labels, batch_sizes=sizes,
                max_accuracy_drop=args.max_accuracy_drop, min_agreement=args.min_agreement, device=args.device,
                threads=args.threads, **common,
            )  # fmt: skip
        print(done.table())
    finally:
        client.close()
    return 0


def cmd_ensembles(args: argparse.Namespace) -> int:
    from hetbatch.worker.modelops.evaluation import evaluate

    client = client_for(args)
    try:
        spec = evaluate(client, args.name, args.data, args.label, metric=args.metric, timeout_s=args.timeout_s)
    finally:
        client.close()
    params: dict[str, Any] = dict(spec.params)
    for ref, value in params["scores"].items():
        print(f"  {ref:40} {params['metric']} = {value:.6g}{'   <- chosen' if ref == params['choice'] else ''}")
    print(f"registered {spec.ref}: select runs {params['choice']}")
    return 0
