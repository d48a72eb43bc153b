"""The floor plan, pinned: import graph, module sizes, one owner per concept, docs that name real paths.

Everything here reads the source (AST and text); nothing is imported. The library's
modules are the ``.py`` files under ``producers/``, ``worker/``, ``adapters/`` (installed
as ``hetbatch.producers`` and so on) and ``hetbatch/*.py``.
"""

from __future__ import annotations

import ast
import itertools
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("producers", "worker", "adapters")
MAX_LINES = 400
# The modules of the producer's client (issue 15: API, publisher, routing, replies, jobs,
# the asyncio twin): the shared protocol must not depend on any of them.
CLIENT_MODULES = ("client", "publisher", "routing", "replies", "jobs", "aio")
KEYS_MODULE = "hetbatch.producers.protocol.keys"
KOMBU_MODULE = "hetbatch.producers.protocol.kombu"


@cache
def modules() -> dict[str, Path]:
    """Every library module by its installed name (``hetbatch.worker.ops.dlq``)."""
    found = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = ("hetbatch", *path.relative_to(ROOT).with_suffix("").parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "hetbatch").glob("*.py")):  # the symlinked folders are covered above
        found["hetbatch" if path.stem == "__init__" else f"hetbatch.{path.stem}"] = path
    return found


@cache
def tree(name: str) -> ast.Module:
    return ast.parse(modules()[name].read_text(), filename=str(modules()[name]))


def _is_package(name: str) -> bool:
    return modules()[name].name == "__init__.py"


def _type_checking_only(module: ast.Module) -> set[int]:
    """ids of import nodes under ``if TYPE_CHECKING:``: never executed, so no runtime cycle."""
    skip = set()
    for node in ast.walk(module):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def raw_imports(name: str) -> Iterator[tuple[str, tuple[str, ...], int]]:
    """``(module, imported names, line)`` of every import statement, function-level ones too;
    relative imports resolved to absolute names."""
    module = tree(name)
    skip = _type_checking_only(module)
    for node in ast.walk(module):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, (), node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if _is_package(name) else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield base, tuple(a.name for a in node.names), node.lineno


def edges(name: str) -> set[str]:
    """Library modules that ``name`` imports: ``from hetbatch.a import b`` is ``hetbatch.a.b``
    when ``b`` is a submodule; the implicit import of parent packages is not counted."""
    known = modules()
    out = set()
    for base, names, _line in raw_imports(name):
        if not base.startswith("hetbatch"):
            continue
        subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
        if subs:
            out |= set(subs)
        if len(subs) < len(names) or not names:
            target = base
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target:
                out.add(target)
    out.discard(name)
    return out


def cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    graph = {n: sorted(edges(n)) for n in modules()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            if i < len(graph[node]):
                work.append((node, i + 1))
                nxt = graph[node][i]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_module_map_sees_the_library() -> None:
    names = modules()
    assert {"hetbatch", "hetbatch.producers", "hetbatch.worker", "hetbatch.adapters"} <= set(names)
    assert "hetbatch.producers.protocol.wire" in names and len(names) > 40


def test_the_graph_resolves_submodules_and_relative_imports() -> None:
    # ``from hetbatch.producers.protocol import wire``-style imports land on the submodule.
    assert "hetbatch.producers.client" in edges("hetbatch.producers") or any(
        n.startswith("hetbatch.producers.") for n in edges("hetbatch.producers")
    )
    assert "hetbatch.producers" in edges("hetbatch")


def test_no_import_cycle_counting_function_level_imports() -> None:
    assert cycles() == []


def test_no_module_over_400_lines() -> None:
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def _imports_of(prefix: str) -> dict[str, set[str]]:
    return {name: edges(name) for name in modules() if name == prefix or name.startswith(prefix + ".")}


def _offending(prefix: str, forbidden: tuple[str, ...]) -> dict[str, set[str]]:
    bad = {}
    for name, targets in _imports_of(prefix).items():
        hits = {t for t in targets if any(t == f or t.startswith(f + ".") for f in forbidden)}
        if hits:
            bad[name] = hits
    return bad


def test_producers_import_neither_worker_nor_adapters() -> None:
    assert _offending("hetbatch.producers", ("hetbatch.worker", "hetbatch.adapters")) == {}


def test_adapters_import_neither_worker_nor_producers() -> None:
    assert _offending("hetbatch.adapters", ("hetbatch.worker", "hetbatch.producers")) == {}


def test_the_protocol_imports_nothing_from_the_client() -> None:
    client = tuple(f"hetbatch.producers.{m}" for m in CLIENT_MODULES)
    bad = _offending("hetbatch.producers.protocol", (*client, "hetbatch.worker", "hetbatch.adapters"))
    # The package itself re-exports the client: importing it from the protocol closes a circle.
    bad |= {
        n: {"hetbatch.producers"}
        for n, t in _imports_of("hetbatch.producers.protocol").items()
        if "hetbatch.producers" in t
    }
    assert bad == {}


def _docstring_ids(module: ast.Module) -> set[int]:
    ids = set()
    for node in ast.walk(module):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def key_literals(name: str) -> list[str]:
    """Redis key names spelled out in ``name``: ``"hb:..."`` strings, f-strings that put a
    ``:`` right after a ``{...prefix...}`` field, and any ``:lane`` fragment."""
    module = tree(name)
    docs = _docstring_ids(module)
    in_fstring = {id(v) for node in ast.walk(module) if isinstance(node, ast.JoinedStr) for v in node.values}
    found = []
    for node in ast.walk(module):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            if (node.value.startswith("hb:") and id(node) not in in_fstring) or ":lane" in node.value:
                found.append(f"{node.lineno}: {node.value!r}")
        elif isinstance(node, ast.JoinedStr):
            values = node.values
            for left, right in itertools.pairwise(values):
                if (
                    isinstance(left, ast.FormattedValue)
                    and "prefix" in ast.unparse(left.value)
                    and isinstance(right, ast.Constant)
                    and str(right.value).startswith(":")
                ):
                    found.append(f"{node.lineno}: {ast.unparse(node)}")
            if values and isinstance(values[0], ast.Constant) and str(values[0].value).startswith("hb:"):
                found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_redis_key_names_are_spelled_in_one_module() -> None:
    assert KEYS_MODULE in modules(), "producers/protocol/keys.py owns every Redis key name (issue 15)"
    spelled = {name: hits for name in modules() if name != KEYS_MODULE and (hits := key_literals(name))}
    assert spelled == {}


def _top_level_importers(package: str) -> set[str]:
    return {
        name for name in modules() if any(base.split(".")[0] == package for base, _names, _line in raw_imports(name))
    }


def test_kombu_is_imported_in_one_module() -> None:
    assert _top_level_importers("kombu") <= {KOMBU_MODULE}


def test_argparse_lives_in_the_cli_package() -> None:
    outside = {n for n in _top_level_importers("argparse") if not n.startswith("hetbatch.worker.cli")}
    assert outside == set()


def test_lua_scripts_ship_as_files_the_code_reads() -> None:
    """Lua lives in ``.lua`` files (issue 15), not in Python strings: no ``redis.call(`` in a .py."""
    inline = {name for name, path in modules().items() if "redis.call(" in path.read_text()}
    assert inline == set()
    assert sorted((ROOT / "producers" / "protocol" / "lua").glob("*.lua")), "no .lua files yet"


# -- docs name real things ---------------------------------------------------------

DOCS = [ROOT / "README.md", ROOT / "SECURITY.md", *sorted((ROOT / "docs").glob("*.md"))]
_TICKED = re.compile(r"`([^`\n]+)`")
_PATH = re.compile(r"^(?:\./)?((?:producers|worker|adapters|hetbatch|tests|bench|scripts|docs)/[\w./-]*)$")
_MODULE = re.compile(r"^(hetbatch(?:\.\w+)+)(?::\w+)?$")
_RUN_MODULE = re.compile(r"python3? -m ([\w.]+)")


def _ticked() -> Iterator[tuple[str, str]]:
    for doc in DOCS:
        text = doc.read_text()
        for match in _TICKED.finditer(text):
            yield doc.name, match.group(1).strip()
        for match in re.finditer(r"```.*?```", text, flags=re.S):  # code blocks: module runs
            for run in _RUN_MODULE.finditer(match.group(0)):
                yield doc.name, f"-m {run.group(1)}"


def _module_exists(dotted: str) -> bool:
    """``hetbatch.a.b`` names a module or package, or a name a module defines (``hetbatch.Client``),
    or a string the library spells (a task name such as ``hetbatch.lane``, a metadata key)."""
    known = modules()
    if any(f'"{dotted}"' in path.read_text() for path in known.values()):
        return True
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in known:
            return i == len(parts) or re.search(rf"\b{parts[i]}\b", known[prefix].read_text()) is not None
    return False


def test_paths_and_modules_named_in_the_docs_exist() -> None:
    missing = []
    for doc, token in _ticked():
        if m := _PATH.match(token):
            path = m.group(1).rstrip("/.")
            if "*" not in path and "<" not in path and not (ROOT / path).exists():
                missing.append(f"{doc}: {token}")
        elif m := _MODULE.match(token):
            if not _module_exists(m.group(1)):
                missing.append(f"{doc}: {token}")
        elif token.startswith("-m "):
            target = token[3:]
            top, where = target.split(".")[0], ROOT / target.replace(".", "/")
            # The old top-level names are not installed any more; repo modules must exist.
            stale = top in FOLDERS
            absent = top in ("bench", "scripts", "tests") and not (where.with_suffix(".py").exists() or where.is_dir())
            if stale or absent:
                missing.append(f"{doc}: python -m {target}")
    assert missing == []


def test_docs_use_the_one_import_name() -> None:
    stale = re.compile(r"^\s*(?:from|import) (producers|worker|adapters)\b", re.M)
    found = [f"{doc.name}: {m.group(0).strip()}" for doc in DOCS for m in stale.finditer(doc.read_text())]
    assert found == []


@pytest.mark.parametrize(
    "folder", ["producers/protocol", "worker/ops", "worker/modelops", "worker/cli", "adapters/offline"]
)
def test_the_readme_map_names_every_folder(folder: str) -> None:
    assert f"`{folder}/`" in (ROOT / "README.md").read_text(), f"README's 'Where things are' leaves out {folder}/"
