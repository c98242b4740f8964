"""Structure of the code base: short functions, no import cycles, and what a report loads.

Two rules of the project's guide, checked on the source with ``ast`` (nothing is imported):

- no function body longer than :data:`MAX_BODY_LINES` lines (``end_lineno - lineno`` of the
  body, i.e. from its first statement, docstring included, to its last line);
- no import cycle between the modules of ``pipeline`` and ``models`` (every ``import`` and
  ``from ... import`` counts, wherever it sits: a local import inside a function still ties
  the two modules together).

Each failure lists every offender (file:line and length, or the modules of each cycle).

And one layer: a study's description (:mod:`pipeline.study_spec`) and the report read a
study without its execution, so importing them in a fresh interpreter loads neither torch
nor submitit nor :mod:`pipeline.study`.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "models")
MAX_BODY_LINES = 80


def _sources() -> dict[str, Path]:
    """Dotted module name -> file, for every module under :data:`PACKAGES`."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def body_length(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function's body, from its first statement to its last line."""
    return node.body[-1].end_lineno - node.body[0].lineno + 1


def long_functions(sources: dict[str, Path], limit: int = MAX_BODY_LINES, root: Path = ROOT) -> list[str]:
    """``file:line name (n lines)`` of every function whose body exceeds ``limit`` lines."""
    offenders = []
    for path in sources.values():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = body_length(node)
                if n > limit:
                    rel = path.relative_to(root)
                    offenders.append(f"{rel}:{node.lineno} {node.name} ({n} lines)")
    return sorted(offenders)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(sources: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of ``sources`` it imports (``from pkg import mod`` included)."""
    graph: dict[str, set[str]] = {m: set() for m in sources}
    for module, path in sources.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node)
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for target in targets:
                # The deepest known module the name points into.
                parts = target.split(".")
                while parts and ".".join(parts) not in sources:
                    parts.pop()
                if parts and ".".join(parts) != module:
                    graph[module].add(".".join(parts))
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted.

    A package's ``__init__`` importing its own submodules, which import the package back
    for a sibling, is not counted: an edge from a module to a package that contains it is
    ignored (Python resolves it to the submodule already being loaded).
    """
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


# ---------------------------------------------------------------- the checkers themselves


def _write(tmp: Path, files: dict[str, str]) -> dict[str, Path]:
    sources = {}
    for name, text in files.items():
        path = tmp / (name.replace(".", "/") + ".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        sources[name] = path
    return sources


def test_checker_finds_a_long_function_and_spares_a_short_one(tmp_path):
    body_ok = "\n".join(f"    x{i} = {i}" for i in range(MAX_BODY_LINES))
    body_long = "\n".join(f"    y{i} = {i}" for i in range(MAX_BODY_LINES + 1))
    sources = _write(tmp_path, {"pkg.ok": f"def short():\n{body_ok}\n", "pkg.bad": f"\n\ndef long():\n{body_long}\n"})
    offenders = long_functions(sources, root=tmp_path)
    assert offenders == [f"pkg/bad.py:3 long ({MAX_BODY_LINES + 1} lines)"]


def test_checker_finds_a_cycle_through_local_and_relative_imports(tmp_path):
    sources = _write(
        tmp_path,
        {
            "pkg.__init__": "",
            "pkg.a": "from pkg import b\n",
            "pkg.b": "def f():\n    from .c import g\n",
            "pkg.c": "import pkg.a\n",
            "pkg.d": "from pkg.a import x\n",
        },
    )
    sources["pkg"] = sources.pop("pkg.__init__")
    assert import_cycles(import_graph(sources)) == [["pkg.a", "pkg.b", "pkg.c"]]


# ---------------------------------------------------------------- the code base


def test_no_function_body_longer_than_the_limit():
    offenders = long_functions(_sources())
    assert not offenders, f"{len(offenders)} function bodies longer than {MAX_BODY_LINES} lines:\n  " + "\n  ".join(
        offenders
    )


def test_no_import_cycle_in_pipeline_and_models():
    cycles = import_cycles(import_graph(_sources()))
    assert not cycles, "import cycles:\n  " + "\n  ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("package", PACKAGES)
def test_the_check_sees_every_package(package):
    assert any(m == package or m.startswith(package + ".") for m in _sources())


# ---------------------------------------------------------------- what a report loads

#: Modules that reading a study (its description, a report) must not load: the study's
#: execution, training and their heavy dependencies.
NOT_FOR_READING = ("torch", "submitit", "pipeline.study", "pipeline.train", "pipeline.dataset")


def test_the_report_and_the_study_description_load_no_execution():
    """A report and a dry run read a study through :mod:`pipeline.study_spec`; importing it and
    :mod:`pipeline.report` in a fresh interpreter loads neither torch nor submitit nor the
    study's execution (:mod:`pipeline.study`)."""
    code = (
        "import json, sys\n"
        "import pipeline.report, pipeline.study_spec\n"
        f"print(json.dumps(sorted(m for m in {list(NOT_FOR_READING)!r} if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
