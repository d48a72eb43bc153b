"""The distribution: one import name, pinned exports, a wheel that carries every module, lazy frameworks.

The wheel test builds the wheel from a copy of the source, installs it with
``pip install --no-deps`` into a fresh venv that sees nothing else, and checks what a
user of the wheel sees: ``hetbatch`` and nothing else at top level.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path
from typing import Any, cast

import pytest

import hetbatch

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("producers", "worker", "adapters")
PUBLIC = {
    "AsyncClient",
    "AsyncJob",
    "BrokerError",
    "Client",
    "ClientSettings",
    "ConfigError",
    "HetbatchError",
    "Job",
    "JobDeleted",
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
    "__version__",
}


def test_public_exports_are_pinned() -> None:
    assert set(hetbatch.__all__) == PUBLIC
    assert all(getattr(hetbatch, name) is not None for name in hetbatch.__all__)


def _pyproject() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the package itself supports 3.10
    return cast(dict[str, Any], tomllib.loads((ROOT / "pyproject.toml").read_text()))


def test_the_version_is_the_distributions() -> None:
    project = _pyproject()["project"]
    assert hetbatch.__version__ == project["version"]


def _package_folders() -> dict[str, Path]:
    """Installed package name -> folder, for every folder with an ``__init__.py``."""
    found = {"hetbatch": ROOT / "hetbatch"}
    for folder in FOLDERS:
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT).parts
            found[".".join(("hetbatch", *rel))] = init.parent
    return found


def test_pyproject_lists_every_package_folder() -> None:
    """setuptools installs only the packages listed: a new folder must be added there."""
    tool = _pyproject()["tool"]["setuptools"]
    assert set(tool["packages"]) == set(_package_folders())
    # A folder of library code without an __init__.py would be left out silently.
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            assert (path.parent / "__init__.py").exists(), f"{path.parent} has modules but no __init__.py"


def _expected_wheel_files() -> set[str]:
    """Every module and data file of the library, as the wheel must name it."""
    names = {f"hetbatch/{p.name}" for p in (ROOT / "hetbatch").iterdir() if p.is_file() and not p.is_symlink()}
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".lua", ".typed") and "__pycache__" not in path.parts:
                names.add(f"hetbatch/{path.relative_to(ROOT).as_posix()}")
    return names


def _copy_source(dest: Path) -> Path:
    """The files a build reads, copied: an in-tree build would leave build/ in the checkout."""
    src = dest / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in (*FOLDERS, "hetbatch"):
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=ignore)
    return src


def _run(args: list[str], cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = _copy_source(tmp)
    # No build isolation: the build runs offline with this venv's setuptools.
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)], cwd=tmp)
    (found,) = (tmp / "dist").glob("hetbatch-*.whl")
    return found


def test_the_wheel_holds_hetbatch_only_and_every_module(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    top = {n.split("/")[0] for n in names}
    dist_info = {t for t in top if t.startswith("hetbatch-") and t.endswith(".dist-info")}
    assert top - dist_info == {"hetbatch"} and len(dist_info) == 1
    assert _expected_wheel_files() - names == set()


def test_a_fresh_venv_with_the_wheel_imports_hetbatch_and_nothing_else(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False, symlinks=True)  # no system site-packages
    python = env_dir / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "--python", str(python)]
    _run([*pip, "install", "--no-deps", "--no-index", str(wheel)], cwd=tmp_path)
    empty = tmp_path / "elsewhere"  # not the checkout, whose folders would shadow the install
    empty.mkdir()
    bare = (
        "import importlib.util as u, sys\n"
        "for name in ('producers', 'worker', 'adapters'):\n"
        "    assert u.find_spec(name) is None, name\n"
        "    try:\n"
        "        __import__(name)\n"
        "    except ModuleNotFoundError:\n"
        "        pass\n"
        "    else:\n"
        "        raise AssertionError(name + ' is importable')\n"
        "print(u.find_spec('hetbatch').origin)\n"
    )
    origin = _run([str(python), "-c", bare], cwd=empty).strip()
    assert Path(origin).is_relative_to(env_dir), origin
    # The wheel has no dependencies installed; borrow this venv's site-packages *after*
    # the fresh one's, without its .pth files (so the editable install's hook stays out),
    # to import the whole package from the wheel.
    site = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "celery").exists())
    full = (
        f"import sys; sys.path.append({site!r})\n"
        "import hetbatch, hetbatch.worker.app, hetbatch.worker.cli, hetbatch.adapters\n"
        "from hetbatch import Client, AsyncClient\n"
        "import importlib.util as u\n"
        "assert all(u.find_spec(n) is None for n in ('producers', 'worker', 'adapters'))\n"
        "print(hetbatch.__file__)\n"
    )
    origin = _run([str(python), "-c", full], cwd=empty).strip()
    assert Path(origin).is_relative_to(env_dir), origin
    assert "usage: hetbatch" in _run(
        [
            str(python),
            "-c",
            f"import sys; sys.path.append({site!r}); "
            "sys.argv = ['hetbatch', '--help']; import runpy; "
            "runpy.run_module('hetbatch', run_name='__main__')",
        ],
        cwd=empty,
    )


# The adapter of a framework imports it: the adapter registry imports that module only
# when a model of that framework is loaded.
FRAMEWORK_ADAPTERS = {"hetbatch.adapters.torch", "hetbatch.adapters.tensorflow"}


def _library_modules() -> list[str]:
    names = []
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = ("hetbatch", *path.relative_to(ROOT).with_suffix("").parts)
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return [n for n in names if n not in FRAMEWORK_ADAPTERS]


def test_importing_the_library_imports_no_framework() -> None:
    """Every module but a framework's own adapter imports without torch or tensorflow
    (a worker of scikit-learn models must not pay seconds and hundreds of MB for them)."""
    code = (
        "import importlib, sys\n"
        f"for name in {_library_modules()!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_nothing_calls_pickle_on_wire_data() -> None:
    for package in FOLDERS:
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            assert "pickle.load" not in text and "import pickle" not in text, path
