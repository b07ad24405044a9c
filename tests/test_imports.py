"""The package's import structure: no import circle, every module importable first.

Dependencies flow one way (README, "How it is built"): protocol/config -> stores ->
chat -> transport -> routes -> app factory. An import inside a function hides a
circle from Python until that function runs, so the graph below counts those
too; only imports under ``if TYPE_CHECKING:`` are left out (never executed).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import ROOT, TIMEOUT

PACKAGE = ROOT / "wschat"


def modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the package: dotted name -> (file, is a package's __init__)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {wschat module it imports: line}, imports inside functions included."""
    known = modules()
    graph: dict[str, dict[str, int]] = {}
    for module, (path, is_package) in known.items():
        tree = ast.parse(path.read_text(), str(path))
        type_checking_only = {
            id(inner) for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for inner in ast.walk(node)}
        edges = graph.setdefault(module, {})
        for node in ast.walk(tree):
            if id(node) in type_checking_only:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = module.split(".")[:None if is_package else -1]
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from . import x` imports the module x; `from .m import name`, m
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                           for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target and target != module:
                    edges.setdefault(target, node.lineno)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circles() -> None:
    """No module of wschat reaches itself through its imports, lazy ones included."""
    graph = import_graph()
    assert "wschat.factory" in graph["wschat.wsgi"]  # the graph sees real edges
    described = [
        "among " + ", ".join(c) + ":\n" + "\n".join(
            f"    {a}:{line} imports {b}" for a in c for b, line in graph[a].items() if b in c)
        for c in cycles(graph)]
    assert not described, "import circles:\n" + "\n".join(described)


def test_cycle_finder_finds_a_circle() -> None:
    """The check above can fail: a two-module circle is reported."""
    assert cycles({"a": {"b": 1}, "b": {"a": 2}, "c": {"a": 3}}) == [["a", "b"]]


def test_every_module_imports_first() -> None:
    """Each module imports in a fresh process with no other wschat module loaded before it
    (a forked child per module), and importing the package builds no app."""
    names = sorted(m for m in modules() if m != "wschat.__main__")
    script = textwrap.dedent("""
        import importlib, os, sys
        # The third-party libraries once, in the parent; each child imports wschat afresh.
        for lib in ("flask", "flask_sock", "gevent", "orjson", "jwt", "prometheus_client",
                    "prometheus_flask_exporter", "redis", "wsproto", "simple_websocket"):
            importlib.import_module(lib)
        failed = []
        for name in sys.argv[1:]:
            pid = os.fork()
            if pid == 0:
                try:
                    importlib.import_module(name)
                    if name == "wschat":
                        assert "wschat.factory" not in sys.modules, "the root loaded the factory"
                except BaseException as exc:
                    print(f"{name}: {type(exc).__name__}: {exc}", flush=True)
                    os._exit(1)
                os._exit(0)
            if os.waitpid(pid, 0)[1] != 0:
                failed.append(name)
        sys.exit(1 if failed else 0)
    """)
    env = {"PATH": "/usr/bin:/bin", "LOG_LEVEL": "warning"}  # wschat.wsgi builds an app
    done = subprocess.run([sys.executable, "-c", script, *names], capture_output=True,
                          text=True, timeout=6 * TIMEOUT, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stdout + done.stderr


def test_readme_map_names_every_module() -> None:
    """The README's "How it is built" map names every module and subpackage of wschat: a
    module of a subpackage in that subpackage's entry, or by its path anywhere."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## How it is built", 1)[1].split("```", 2)[1]
    entries: dict[str, str] = {}  # "wschat/stores/" -> its text, continuation lines included
    for line in filter(None, block.splitlines()):
        if line[:1].strip():
            key = line.split()[0]
            entries[key] = ""
        entries[key] += " " + line

    def named(text: str, name: str) -> bool:
        return re.search(rf"(?<![\w/.]){re.escape(name)}(?![\w/])", text) is not None

    missing = []
    for module, (path, is_package) in modules().items():
        rel = path.relative_to(PACKAGE)
        if module == "wschat":
            continue
        if is_package:
            found = f"wschat/{rel.parent}/" in entries
        elif len(rel.parts) == 1:
            found = (named(block, f"wschat/{rel}") or named(block, rel.name)
                     or named(block, f"`python -m {module}`"))
        else:
            found = (named(entries.get(f"wschat/{rel.parent}/", ""), path.name)
                     or named(block, str(rel)))
        if not found:
            missing.append(str(rel))
    assert not missing, f"not in the README's map: {missing}"
