"""Benchmark row: a 3-member ensemble end to end beside its members' in-process times.

The ensemble is a soft vote over a scikit-learn forest, its ONNX conversion and a
scikit-learn logistic regression (two frameworks, two queues). End to end is
``Client.predict`` through a private redis-server and one real CPU worker: fan-out,
three member calls, the fusion step, the result back. The in-process figure is the
sum of the three members' own calls on the same rows (the calls the adapters make,
in the client's 65,536-row chunks), plus the same fusion function run once.

    python -m bench.ensemble [--quick] [--rows N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["run"]

CHUNK_ROWS = 65_536
FEATURES = 20


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _build(root: Path) -> tuple[dict[str, Callable[[np.ndarray], dict[str, np.ndarray]]], np.ndarray]:
    """Train the members, write them as registrable directories; returns in-process calls."""
    import onnxruntime as ort
    import skops.io as sio
    from skl2onnx import to_onnx
    from sklearn.datasets import make_classification
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from hetbatch.worker.modelops.config import write_config

    X, y = make_classification(4000, FEATURES, n_informative=10, n_classes=3, random_state=0)
    forest = RandomForestClassifier(n_estimators=50, max_depth=10, random_state=0, n_jobs=1).fit(X, y)
    logreg = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(X, y)
    for name, model in (("bench-ens-forest", forest), ("bench-ens-logreg", logreg)):
        (root / name).mkdir(parents=True, exist_ok=True)
        sio.dump(model, root / name / "model.skops")
        write_config(root / name, name=name, framework="sklearn", artifact="model.skops")
    onx = to_onnx(forest, X[:1].astype(np.float32), options={"zipmap": False}, target_opset=17)
    (root / "bench-ens-onnx").mkdir(parents=True, exist_ok=True)
    (root / "bench-ens-onnx" / "model.onnx").write_bytes(onx.SerializeToString())
    write_config(
        root / "bench-ens-onnx", name="bench-ens-onnx", framework="onnx", artifact="model.onnx", classes=[0, 1, 2]
    )
    opts = ort.SessionOptions()
    session = ort.InferenceSession(
        str(root / "bench-ens-onnx" / "model.onnx"), opts, providers=["CPUExecutionProvider"]
    )

    def sk(model: Any) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
        return lambda x: {"label": model.predict(x), "probabilities": model.predict_proba(x)}

    def onnx_call(x: np.ndarray) -> dict[str, np.ndarray]:
        label, proba = session.run(None, {"X": x.astype(np.float32)})
        return {"label": label, "probabilities": proba}

    calls = {"bench-ens-forest": sk(forest), "bench-ens-onnx": onnx_call, "bench-ens-logreg": sk(logreg)}
    return calls, X


def run(rows: int = 100_000, repeats: int = 3, workdir: str = ".bench/ensemble") -> dict[str, Any]:
    """Measure; returns the figures (also what ``--json`` writes)."""
    from bench.setup import start_worker, stop_process
    from hetbatch.producers import Client
    from hetbatch.worker.devtools.redis_server import RedisServer
    from hetbatch.worker.ensemble import result_arrays
    from hetbatch.worker.fusion import MemberOutput, fuse
    from hetbatch.worker.modelops.registration import register_path

    root = Path(workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    calls, base = _build(root)
    rng = np.random.default_rng(1)
    X = base[rng.integers(0, len(base), rows)] + rng.normal(0, 0.1, (rows, FEATURES))
    ens = root / "bench-ens"
    ens.mkdir(exist_ok=True)
    members = "".join(f'[[members]]\nname = "{n}"\n' for n in calls)
    (ens / "model.toml").write_text(
        f'kind = "ensemble"\nname = "bench-ens"\nstrategy = "vote"\n[params]\nkind = "soft"\n{members}'
    )

    def in_process() -> dict[str, dict[str, np.ndarray]]:
        outs: dict[str, list[dict[str, np.ndarray]]] = {n: [] for n in calls}
        for n, call in calls.items():
            for start in range(0, rows, CHUNK_ROWS):
                outs[n].append(call(X[start : start + CHUNK_ROWS]))
        return {n: {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} for n, parts in outs.items()}

    member_s = {
        n: _median_s(lambda c=c: [c(X[s : s + CHUNK_ROWS]) for s in range(0, rows, CHUNK_ROWS)], repeats)
        for n, c in calls.items()
    }
    outputs = in_process()
    members_out = [MemberOutput(n, outputs[n], "probabilities", 1.0, (0, 1, 2)) for n in calls]
    params = {"kind": "soft", "classes": [0, 1, 2]}
    fusion_s = _median_s(lambda: fuse("vote", members_out, params), repeats)
    expected = fuse("vote", members_out, params)

    with RedisServer() as server, Client.from_url(server.url) as client:
        for n in calls:
            register_path(client.registry, root / n)
        register_path(client.registry, ens)
        worker = start_worker(server.url, root / "worker.log")
        try:
            client.predict("bench-ens", X[:256], timeout_s=300)  # load the members on the worker
            e2e_s = _median_s(lambda: client.predict("bench-ens", X, timeout_s=600), repeats)
            got = result_arrays(client.predict("bench-ens", X, timeout_s=600))
        finally:
            stop_process(worker)
    members_sum_s = sum(member_s.values())
    return {
        "rows": rows,
        "members": list(calls),
        "member_inprocess_s": member_s,
        "members_sum_inprocess_s": members_sum_s,
        "inprocess_fusion_s": fusion_s,
        "inprocess_rows_s": rows / (members_sum_s + fusion_s),
        "ensemble_e2e_s": e2e_s,
        "ensemble_e2e_rows_s": rows / e2e_s,
        "inprocess_sum_s_over_e2e_s": (members_sum_s + fusion_s) / e2e_s,
        "labels_equal": int((got["label"] == expected["label"]).sum()),
        "max_abs_prob_diff": float(np.abs(got["probabilities"] - expected["probabilities"]).max()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="20,000 rows, 1 repeat")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    args = parser.parse_args(argv)
    rows = args.rows or (20_000 if args.quick else 100_000)
    result = run(rows=rows, repeats=1 if args.quick else args.repeats)
    print(f"3-member ensemble (soft vote: sklearn forest + its ONNX conversion + sklearn logreg), {rows:,} rows")
    for name, seconds in result["member_inprocess_s"].items():
        print(f"  {name:24} in-process {seconds:8.3f} s  {rows / seconds:12,.0f} rows/s")
    print(f"  {'fusion (soft vote)':24} in-process {result['inprocess_fusion_s']:8.3f} s")
    inproc_s = result["members_sum_inprocess_s"] + result["inprocess_fusion_s"]
    e2e_s = result["ensemble_e2e_s"]
    print(f"  {'sum of members + fusion':24} in-process {inproc_s:8.3f} s  {result['inprocess_rows_s']:12,.0f} rows/s")
    print(f"  {'ensemble end to end':24} via queue  {e2e_s:8.3f} s  {result['ensemble_e2e_rows_s']:12,.0f} rows/s")
    print(f"  ratio (in-process sum / end to end) {result['inprocess_sum_s_over_e2e_s']:.2f}")
    print(f"  labels equal {result['labels_equal']:,}/{rows:,}; max |prob diff| {result['max_abs_prob_diff']:.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
