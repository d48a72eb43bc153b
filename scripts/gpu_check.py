#!/usr/bin/env python3
"""GPU check: torch and ONNX Runtime models on a GPU through a real hetbatch worker.

One command, a few minutes on one GPU (see docs/gpu.md)::

    python -m scripts.gpu_check [--out gpu_check.json] [--rows 131072]   # from the repository root

It starts a private redis-server, a ``hetbatch worker --pool gpu --gpus 0`` and a
``hetbatch worker --pool cpu`` process, registers an MLP as TorchScript and as ONNX on
both devices, and then:

- checks every queue result against the same model's in-process output on that device,
  and the GPU output against the CPU output (max abs diff; ONNX with TF32 on and off);
- confirms placement: the device the worker says ran each result (``hetbatch.device``),
  the providers a session is actually active on, the worker log's provider/device lines,
  ``libcuda`` mapped in the gpu worker and not in the cpu worker, and the GPU memory
  each worker process holds (nvidia-smi);
- sends one batch sized past the card's memory to a torch model, twice: the first is
  halved until it fits, with an exact result; the second must meet no OOM at all (the
  learned call size is kept);
- prints rows/s through the queue and in-process, GPU beside CPU;
- writes the figures as JSON to ``--out`` (default ``$OUT/gpu_check.json`` when ``$OUT``
  is set, else ``./gpu_check.json``), always, with the tail of every worker log, also
  when setup fails; the worker logs are copied beside it.

Without CUDA it says so and exits with status 2; ``--cpu-dry-run`` runs the plumbing on
the CPU instead (gpu models with ``fallback = "cpu"``, no OOM step). Exit status 1 means
a check failed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

OOM_WIDTH = 256  # features of the OOM model's input
OOM_FANOUT = 16_384  # the OOM model materializes (rows, OOM_WIDTH, OOM_FANOUT) float32: 16 MiB a row
BATCH_ROWS = 8192  # max_batch_rows of the throughput models, and the in-process chunk: same shapes


def probe() -> dict[str, Any]:
    """What this machine offers: torch and ONNX Runtime versions, CUDA, the GPU."""
    found: dict[str, Any] = {"torch": None, "torch_cuda": False, "onnxruntime": None, "ort_cuda": False}
    try:
        import torch

        found["torch"] = torch.__version__
        found["torch_cuda"] = bool(torch.cuda.is_available())
        if found["torch_cuda"]:
            props = torch.cuda.get_device_properties(0)
            found["gpu"] = props.name
            found["gpu_memory_bytes"] = int(props.total_memory)
    except ImportError:
        pass
    try:
        import onnxruntime as ort

        found["onnxruntime"] = ort.__version__
        found["ort_providers"] = list(ort.get_available_providers())
        found["ort_cuda"] = "CUDAExecutionProvider" in found["ort_providers"]
    except ImportError:
        pass
    return found


def build_models(directory: Path, features: int, hidden: int) -> dict[str, Path]:
    """An MLP as TorchScript and the same weights as ONNX, and the OOM model (TorchScript)."""
    import onnx
    import torch
    from onnx import TensorProto, helper, numpy_helper

    torch.manual_seed(0)
    dims = [features, hidden, hidden, 16]
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        layers.append(torch.nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(torch.nn.ReLU())
    mlp = torch.nn.Sequential(*layers).eval()
    out: dict[str, Path] = {}
    (directory / "mlp-torch").mkdir(parents=True)
    out["mlp-torch"] = directory / "mlp-torch" / "model.pt"
    torch.jit.save(torch.jit.trace(mlp, torch.zeros(2, features)), out["mlp-torch"])

    nodes, inits, prev = [], [], "x"
    linears = [m for m in mlp if isinstance(m, torch.nn.Linear)]
    for i, lin in enumerate(linears):
        w = lin.weight.detach().numpy().T.copy()
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(lin.bias.detach().numpy(), f"b{i}")]
        nodes += [
            helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
        ]
        prev = f"a{i}"
        if i < len(linears) - 1:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    nodes.append(helper.make_node("Identity", [prev], ["output"]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, features])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, dims[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (directory / "mlp-onnx").mkdir()
    out["mlp-onnx"] = directory / "mlp-onnx" / "model.onnx"
    onnx.save(model, out["mlp-onnx"])

    class Fanout(torch.nn.Module):
        """(N, d) -> (N, d, K) in memory -> summed back to (N, d): 16 MiB of device memory a row."""

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("w", torch.ones(1, 1, OOM_FANOUT))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x.unsqueeze(2) * self.w).sum(2)

    (directory / "oom").mkdir()
    out["oom"] = directory / "oom" / "model.pt"
    torch.jit.save(torch.jit.script(Fanout()), out["oom"])
    return out


def register(
    client: Any, artifact: Path, name: str, framework: str, device: str, features: int,
    options: dict[str, Any] | None = None, **extra: Any,
) -> str:  # fmt: skip
    from hetbatch.worker.modelops.registration import build_spec, write_config

    # TorchScript does not record shapes: state the input; a traced Sequential calls it "input".
    torch_only = framework == "torch"
    inputs = [{"name": "x", "dtype": "float32", "shape": [features]}] if torch_only else None
    options = {**({"input_names": ["x"]} if torch_only else {}), **(options or {})} or None
    write_config(
        artifact.parent, name=name, framework=framework, artifact=artifact.name, inputs=inputs, options=options
    )
    spec = build_spec(artifact.parent, name=name, device=device, **extra)
    return str(client.registry.register(spec).ref)


def in_process(spec: Any, device: str, x: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
    """Load the registered model here on ``device``, run ``x`` in BATCH_ROWS pieces; placement and output."""
    from hetbatch.adapters import adapter_class

    adapter = adapter_class(spec.framework)(spec.artifact, options=spec.options, device=device).load()
    framework = spec.framework
    facts: dict[str, Any] = {}
    if framework == "onnx":
        facts["provider"] = adapter.session.get_providers()[0]  # type: ignore[attr-defined]
        facts["active_providers"] = list(adapter.session.get_providers())  # type: ignore[attr-defined]
    else:
        facts["tensor_device"] = str(next(iter(adapter.model.state_dict().values())).device)  # type: ignore[attr-defined]
    name = "output"
    adapter.predict({"x": x[:BATCH_ROWS]})  # warm-up: kernels, cuDNN/cuBLAS handles
    started = time.perf_counter()
    parts = [adapter.predict({"x": x[i : i + BATCH_ROWS]})[name] for i in range(0, len(x), BATCH_ROWS)]
    facts["rows_per_s"] = round(len(x) / (time.perf_counter() - started))
    adapter.unload()
    return facts, np.concatenate(parts)


def through_queue(client: Any, ref: str, x: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
    """Warm the worker's model, then time ``x`` through Redis and the worker."""
    from tests.kit.helpers import column

    client.predict(ref, {"x": x[:1024]}, timeout_s=300)
    started = time.perf_counter()
    table = client.predict(ref, {"x": x}, timeout_s=300)
    elapsed = time.perf_counter() - started
    device = (table.schema.metadata or {}).get(b"hetbatch.device", b"?").decode()
    return {"rows_per_s": round(len(x) / elapsed), "ran_on": device}, column(table, "output")


def maps_libcuda(pid: int) -> bool | None:
    try:
        return "libcuda.so" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return None


def oom_step(client: Any, ref: str, rows: int, log: Any) -> dict[str, Any]:
    """One batch of ``rows`` rows that needs more than the card has; the batcher must halve it."""
    rng = np.random.default_rng(1)
    x = rng.integers(-3, 4, size=(rows, OOM_WIDTH)).astype(np.float32)  # small integers: exact sums
    started = time.perf_counter()
    table = client.predict(ref, {"x": x}, timeout_s=300)
    elapsed = time.perf_counter() - started
    from tests.kit.helpers import column

    got = column(table, "output")
    halvings = [int(n) for _, n in re.findall(r"ran out of memory on (\d+) rows; (\d+) rows per call", log.output())]
    return {
        "rows": rows,
        "bytes_needed": rows * OOM_WIDTH * OOM_FANOUT * 4,
        "halved_to_rows": halvings,
        "seconds": round(elapsed, 2),
        "exact": bool(np.array_equal(got, x * OOM_FANOUT)),
        "ran_on": (table.schema.metadata or {}).get(b"hetbatch.device", b"?").decode(),
    }


def run_step(report: dict[str, Any], name: str, step: Any, *args: Any) -> None:
    """Run one step; an exception fails it (recorded with its message) and the rest go on."""
    try:
        step(report, *args)
    except Exception as exc:  # a one-shot run on a lent machine: keep every other figure
        report["checks"][name] = False
        report.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"[:2000]
        print(f"gpu_check: step {name} failed: {exc}", file=sys.stderr, flush=True)


def gpu_memory_by_pid() -> dict[int, int]:
    """MiB of GPU memory per process, as nvidia-smi reports it ({} without nvidia-smi)."""
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {}
    rows = [line.split(",") for line in out.splitlines() if line.strip()]
    return {int(pid): int(mib) for pid, mib in rows if pid.strip().isdigit() and mib.strip().isdigit()}


def step_frameworks(report: dict[str, Any], ctx: dict[str, Any]) -> None:
    """Each usable framework on the gpu and the cpu pool: rows/s, equality, the device that
    ran it, and GPU output against CPU output (ONNX also with TF32 off)."""
    client, args, x, gpu = ctx["client"], ctx["args"], ctx["x"], ctx["gpu"]
    machine = report["machine"]
    usable = {"torch": machine["torch_cuda"], "onnx": machine["ort_cuda"]}
    results: dict[str, Any] = report.setdefault("frameworks", {})
    for fw in ("torch", "onnx"):
        if not (usable[fw] or args.cpu_dry_run):
            results[fw] = {"skipped": f"no CUDA for {fw} here (onnx needs onnxruntime-gpu)"}
            continue
        results[fw] = {}
        outputs: dict[str, np.ndarray] = {}
        # ORT's CUDA provider uses TF32 by default (about 1e-3 relative); torch's matmuls do not.
        variants = [("cpu", None), ("gpu", None)] + ([("gpu-no-tf32", {"use_tf32": False})] if fw == "onnx" else [])
        for label, options in variants:
            device = label.split("-")[0]
            opts = {"max_batch_rows": BATCH_ROWS, **(ctx["extra"] if device == "gpu" else {})}
            name = f"mlp-{fw}-{label}"
            ref = register(client, ctx["paths"][f"mlp-{fw}"], name, fw, device, args.features, options, **opts)
            queue_facts, got = through_queue(client, ref, x)
            local_facts, want = in_process(client.spec(ref), gpu if device == "gpu" else "cpu", x)
            diff = float(np.abs(got - want).max())
            outputs[label] = got
            results[fw][label] = {"queue": queue_facts, "in_process": local_facts, "max_abs_diff": diff}
            if label != "cpu":
                vs_cpu = float(np.abs(got - outputs["cpu"]).max())
                results[fw][label]["gpu_vs_cpu_max_abs_diff"] = vs_cpu
                # Stated tolerance: TF32 keeps 10 mantissa bits; without it float32 sums differ in order only.
                tolerance = 5e-2 if label == "gpu" and fw == "onnx" else 1e-3
                results[fw][label]["gpu_vs_cpu_tolerance"] = tolerance
                report["checks"][f"{fw}.{label}.close_to_cpu"] = vs_cpu <= tolerance
            report["checks"][f"{fw}.{label}.equal"] = diff <= 1e-5
            report["checks"][f"{fw}.{label}.ran_on"] = queue_facts["ran_on"] == (gpu if device == "gpu" else "cpu")


def step_placement(report: dict[str, Any], ctx: dict[str, Any]) -> None:
    """Worker logs name the device; only the gpu worker maps the CUDA driver."""
    gpu_log = ctx["gpu_worker"].output()
    placement = {
        "log_torch_on_cuda": "(torchscript) on cuda" in gpu_log,
        "log_onnx_on_cuda": "runs on CUDAExecutionProvider" in gpu_log,
        "gpu_worker_maps_libcuda": maps_libcuda(ctx["gpu_worker"].proc.pid),
        "cpu_worker_maps_libcuda": maps_libcuda(ctx["cpu_worker"].proc.pid),
        "gpu_memory_mib_by_pid": gpu_memory_by_pid(),
        "gpu_worker_pid": ctx["gpu_worker"].proc.pid,
    }
    report["placement"] = placement
    report["checks"]["cpu_worker_without_cuda"] = placement["cpu_worker_maps_libcuda"] is False
    if report["machine"]["torch_cuda"]:
        report["checks"]["torch_log_on_cuda"] = placement["log_torch_on_cuda"]
    if report["machine"]["ort_cuda"]:
        report["checks"]["onnx_log_on_cuda"] = placement["log_onnx_on_cuda"]


def step_oom(report: dict[str, Any], ctx: dict[str, Any]) -> None:
    """A batch twice the card's memory (rounded up to a power of two rows) through the gpu worker."""
    client = ctx["client"]
    if ctx["args"].cpu_dry_run:  # the step's plumbing only: 4 rows (64 MiB) exhaust nothing
        ref = register(client, ctx["paths"]["oom"], "oom", "torch", "gpu", OOM_WIDTH, max_batch_rows=4, **ctx["extra"])
        report["oom"] = oom_step(client, ref, 4, ctx["cpu_worker"])
        report["checks"]["oom_exact"] = report["oom"]["exact"]
        return
    memory = int(report["machine"]["gpu_memory_bytes"])
    rows = 1 << int(np.ceil(np.log2(2 * memory / (OOM_WIDTH * OOM_FANOUT * 4))))
    ref = register(client, ctx["paths"]["oom"], "oom", "torch", "gpu", OOM_WIDTH, max_batch_rows=rows)
    oom = report["oom"] = oom_step(client, ref, rows, ctx["gpu_worker"])
    report["checks"]["oom_halved_and_exact"] = bool(oom["halved_to_rows"]) and oom["exact"] and oom["ran_on"] == "gpu"
    again = report["oom_second_job"] = oom_step(client, ref, rows, ctx["gpu_worker"])
    # The same job again: the learned call size is kept, so no new halving may appear.
    report["checks"]["oom_learned"] = again["halved_to_rows"] == oom["halved_to_rows"] and again["exact"]
    report["gpu_memory_mib_after_oom"] = gpu_memory_by_pid()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="JSON file for the figures")
    parser.add_argument("--rows", type=int, default=None, help="rows per throughput run (default 131072)")
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--cpu-dry-run", action="store_true", help="no GPU: run the plumbing on the CPU")
    args = parser.parse_args(argv)
    default_out = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else Path("gpu_check.json")
    out_path = Path(args.out) if args.out else default_out
    began = time.perf_counter()
    report: dict[str, Any] = {"machine": probe(), "dry_run": args.cpu_dry_run, "checks": {}}
    machine = report["machine"]
    print(f"gpu_check: {json.dumps(machine)}", flush=True)
    if not args.cpu_dry_run and not (machine["torch_cuda"] or machine["ort_cuda"]):
        report["error"] = "no CUDA: torch sees no GPU and onnxruntime has no CUDAExecutionProvider"
        out_path.write_text(json.dumps(report, indent=2))
        print(f"gpu_check: {report['error']}; nothing to check on this machine (try --cpu-dry-run)", file=sys.stderr)
        return 2

    from hetbatch.producers import Client
    from hetbatch.worker.devtools.redis_server import RedisServer
    from tests.kit.helpers import WorkerProcess

    rows = args.rows or (16_384 if args.cpu_dry_run else 131_072)
    work = Path(tempfile.mkdtemp(prefix="hetbatch-gpu-check-"))
    server: Any = None
    client: Any = None
    workers: list[WorkerProcess] = []
    try:
        server = RedisServer()
        client = Client.from_url(server.url)
        ctx: dict[str, Any] = {
            "args": args,
            "client": client,
            "paths": build_models(work, args.features, args.hidden),
            "x": np.random.default_rng(0).standard_normal((rows, args.features)).astype(np.float32),
            "gpu": "cpu" if args.cpu_dry_run else "gpu",
            # A dry run has no gpu worker: its "gpu" models fall back to the cpu pool.
            "extra": {"fallback": "cpu"} if args.cpu_dry_run else {},
        }
        ctx["cpu_worker"] = WorkerProcess(server.url, work, "--pool", "cpu")
        workers.append(ctx["cpu_worker"])
        if not args.cpu_dry_run:
            ctx["gpu_worker"] = WorkerProcess(server.url, work, "--pool", "gpu", "--gpus", "0")
            workers.append(ctx["gpu_worker"])
        run_step(report, "frameworks", step_frameworks, ctx)
        if not args.cpu_dry_run:
            run_step(report, "placement", step_placement, ctx)
        if args.cpu_dry_run or machine["torch_cuda"]:
            run_step(report, "oom", step_oom, ctx)
        logs = "\n".join(w.output() for w in workers)
        report["worker_errors"] = [line for line in logs.splitlines() if "ERROR" in line][:20]
        report["checks"]["workers_alive"] = all(w.alive() for w in workers)
    except BaseException as exc:  # setup failed (or Ctrl-C): the JSON and the logs still come out
        report["checks"]["setup"] = False
        report["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        print(f"gpu_check: setup failed: {report['error']}", file=sys.stderr, flush=True)
    finally:
        report["worker_logs"] = {w.log.name: w.output()[-4000:] for w in workers}
        for closing in [client, *workers, server]:
            try:
                if closing is not None:
                    closing.close() if closing is client else closing.stop()
            except Exception as exc:  # a failed stop must not lose the report
                print(f"gpu_check: could not stop {closing!r}: {exc}", file=sys.stderr)
        for w in workers:
            try:
                (out_path.parent / w.log.name).write_bytes(w.log.read_bytes())
            except OSError:
                pass
        report["wall_s"] = round(time.perf_counter() - began, 1)
        report["ok"] = bool(report["checks"]) and all(report["checks"].values())
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=2))
    print_summary(report, out_path)
    return 0 if report["ok"] else 1


def print_summary(report: dict[str, Any], out_path: Path) -> None:
    head = f"{'framework':10} {'device':6} {'queue rows/s':>13} {'in-process rows/s':>18} {'max|diff|':>10}"
    print(f"\n{head}  ran on / placement")
    for fw, per in report.get("frameworks", {}).items():
        if "skipped" in per:
            print(f"{fw:10} skipped: {per['skipped']}")
            continue
        for device, r in per.items():
            where = r["in_process"].get("provider") or r["in_process"].get("tensor_device")
            print(
                f"{fw:10} {device:6} {r['queue']['rows_per_s']:>13,} {r['in_process']['rows_per_s']:>18,} "
                f"{r['max_abs_diff']:>10.1e}  {r['queue']['ran_on']} / {where}"
            )
    if "oom" in report:
        o = report["oom"]
        print(
            f"\nOOM: {o['rows']} rows needing {o['bytes_needed'] / 2**30:.0f} GiB -> halved to {o['halved_to_rows']} "
            f"rows per call, exact={o['exact']}, on {o['ran_on']}, {o['seconds']} s"
        )
    if "oom_second_job" in report:
        print(f"OOM, same job again: halvings {report['oom_second_job']['halved_to_rows']} (must equal the first's)")
    if "placement" in report:
        print(f"placement: {report['placement']}")
    failed = [k for k, v in report["checks"].items() if not v]
    verdict = "OK" if report["ok"] else "FAILED: " + ", ".join(failed)
    print(f"\n{verdict} in {report['wall_s']} s; figures in {out_path}")


if __name__ == "__main__":
    sys.exit(main())
