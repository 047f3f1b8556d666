"""Code hygiene: no import cycle among the project's modules, and the linters and type checker clean.

The import graph is built from the source with `ast`, counting every import: module level,
function-local and `if TYPE_CHECKING:` alike. A function-local or type-only import hides a cycle
from the interpreter but not from a reader: the two modules still cannot be understood, tested or
moved apart, which is what the rule is for.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("controller", "probes", "playbooks")


def _modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    found: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an imported name lives in (`controller.stores.Incident` -> `controller.stores`)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its source."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*up, base] if base else up)
                # `from pkg import mod` imports the submodule; `from mod import name` the module.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                owner = _owner(target, modules)
                if owner is not None and owner != module:
                    graph[module].add(owner)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path `a -> b -> ... -> a`, or None when the graph is acyclic (iterative DFS)."""
    colour: dict[str, int] = dict.fromkeys(graph, 0)  # 0 unseen, 1 on the stack, 2 done
    for start in sorted(graph):
        if colour[start]:
            continue
        stack: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        colour[start] = 1
        while stack:
            node, pending = stack[-1]
            if not pending:
                colour[node] = 2
                stack.pop()
                continue
            nxt = pending.pop(0)
            if colour[nxt] == 1:
                path = [n for n, _ in stack]
                return [*path[path.index(nxt) :], nxt]
            if colour[nxt] == 0:
                colour[nxt] = 1
                stack.append((nxt, sorted(graph[nxt])))
    return None


def test_the_graph_builder_sees_every_kind_of_import(tmp_path: Path) -> None:
    """A cycle closed by a function-local import and one closed under TYPE_CHECKING are both found."""
    pkg = tmp_path / "controller"
    (pkg / "sub").mkdir(parents=True)
    (tmp_path / "probes").mkdir()
    (tmp_path / "playbooks").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from controller.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from controller.a import thing\n")
    (pkg / "c.py").write_text("from . import d\n")
    (pkg / "d.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from controller.c import X\n"
    )
    graph = import_graph(tmp_path)
    assert graph["controller.a"] == {"controller.sub.b"}
    assert graph["controller.sub.b"] == {"controller.a"}
    assert graph["controller.c"] == {"controller.d"}
    assert graph["controller.d"] == {"controller.c"}
    assert find_cycle(graph) == ["controller.a", "controller.sub.b", "controller.a"]
    del graph["controller.sub.b"], graph["controller.a"]
    assert find_cycle(graph) == ["controller.c", "controller.d", "controller.c"]
    assert find_cycle({"x": {"y"}, "y": set()}) is None


def test_no_import_cycle_among_the_projects_modules() -> None:
    graph = import_graph(ROOT)
    assert len(graph) > 50, sorted(graph)  # the walk found the packages
    assert "controller.comms.communicator" in graph["controller.loop"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def _run(*command: str) -> None:
    """Run a checker from the repository root; its output is the failure message."""
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    print(done.stdout, done.stderr)
    said = f"{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{said}"


def test_ruff_check_is_clean() -> None:
    _run(sys.executable, "-m", "ruff", "check", ".")


def test_ruff_format_is_clean() -> None:
    _run(sys.executable, "-m", "ruff", "format", "--check", ".")


@pytest.mark.timeout(900)  # a cold run checks 80 modules; the cache makes later runs quick
def test_mypy_is_clean() -> None:
    """Over controller/, probes/ and playbooks/ (`[tool.mypy]` in pyproject.toml: check_untyped_defs)."""
    _run(sys.executable, "-m", "mypy")
