"""The ``gpu`` extra is one matched stack: every CUDA library its requirements resolve to
has one CUDA major (torch, onnxruntime-gpu and onnx together, as pip would install them
on a Linux GPU machine). Resolves metadata only (``pip install --dry-run --report``)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]


def _gpu_requirements() -> list[str]:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return [str(r) for r in extras["gpu"]]


def _cuda_majors(requires: list[str]) -> set[str]:
    """The CUDA majors a package's requirements name: ``nvidia-*-cuNN`` wheels, or the
    CUDA runtime / toolkit packages' own major (the CUDA 13 names carry no suffix)."""
    majors = {m.group(1) for r in requires if (m := re.match(r"nvidia-[\w-]+?-cu(\d+)\b", r))}
    for r in requires:
        m = re.match(r"(?:nvidia-cuda-runtime|cuda-toolkit)(?:\[[^]]*\])?\s*(?:==|~=|>=)\s*(\d+)", r)
        if m:
            majors.add(m.group(1))
    return majors


def test_the_gpu_extra_names_torch_onnxruntime_gpu_and_onnx() -> None:
    names = {re.split(r"[\[<>=~ ]", r, maxsplit=1)[0] for r in _gpu_requirements()}
    assert {"torch", "onnxruntime-gpu", "onnx"} <= names and "onnxruntime" not in names


@pytest.mark.slow
def test_the_gpu_extra_resolves_to_one_cuda_major(tmp_path: Path) -> None:
    """The versions pip picks for the extra on Linux, and the CUDA major each one's own
    requirements name: torch's and onnxruntime-gpu's must be the same."""
    report = tmp_path / "report.json"
    done = subprocess.run(
        [
            sys.executable, "-m", "pip", "install",
            "--dry-run", "--ignore-installed", "--no-deps", "--only-binary", ":all:", "--python-version", "3.11",
            "--platform", "manylinux_2_28_x86_64", "--target", str(tmp_path / "t"), "--report", str(report),
            *_gpu_requirements(),
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if done.returncode != 0 and ("Network is unreachable" in done.stderr or "NewConnectionError" in done.stderr):
        pytest.skip("PyPI is not reachable from here")
    assert done.returncode == 0, done.stderr[-2000:]
    resolved = {i["metadata"]["name"].lower(): i["metadata"] for i in json.loads(report.read_text())["install"]}
    assert "onnxruntime" not in resolved and {"torch", "onnxruntime-gpu", "onnx"} <= set(resolved)
    majors = {n: _cuda_majors(resolved[n].get("requires_dist", [])) for n in ("torch", "onnxruntime-gpu")}
    assert all(len(m) == 1 for m in majors.values()) and majors["torch"] == majors["onnxruntime-gpu"], majors
