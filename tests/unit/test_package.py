"""The package's shape: public exports, the one-way import graph, lazy frameworks."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from hetbatch import producers

ROOT = Path(__file__).resolve().parents[2]


def test_public_exports_are_pinned() -> None:
    assert set(producers.__all__) == {
        "BrokerError",
        "Client",
        "ClientSettings",
        "ConfigError",
        "HetbatchError",
        "Job",
        "JobError",
        "JobExpired",
        "JobFailed",
        "JobLost",
        "JobTimeout",
        "ModelNotFound",
        "ModelSpec",
        "PayloadError",
        "PayloadTooLarge",
        "Registry",
        "RemoteError",
        "SchemaMismatch",
        "Status",
        "TensorSpec",
    }


def _imports(package: str) -> set[str]:
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_the_import_graph_points_one_way() -> None:
    assert not _imports("producers") & {"worker", "adapters"}
    assert not _imports("adapters") & {"worker", "producers"}


def test_importing_the_packages_imports_no_framework() -> None:
    code = (
        "import sys, producers, adapters, worker.app, worker.cli; "
        "print(sorted(m for m in ('torch', 'tensorflow', 'onnxruntime', 'sklearn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_nothing_calls_pickle_on_wire_data() -> None:
    for package in ("producers", "worker", "adapters"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            assert "pickle.load" not in text and "import pickle" not in text, path
